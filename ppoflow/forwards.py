"""What the models are asked in a forward: decoder hidden states, the policy's response logits, a
classifier's per-token values, and whether a model reads packed rows as padded ones (the self-check)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ppoflow.models import scalar_head

log = logging.getLogger(__name__)


def decoder_states(model: nn.Module, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Last hidden states of the model's decoder body for a layout's inputs, flattened: [R*C, H]."""
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1)


# Causal LMs whose logits are more than `lm_head(hidden)` (Gemma 2/3 soft-capping, Cohere's scale,
# Granite's divisor) go through their own forward; for the rest only the needed rows meet the head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def has_logit_transform(model: nn.Module) -> bool:
    """Whether the model's logits are more than its LM head's output."""
    return any(getattr(model.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)


def response_logits(policy: nn.Module, inputs: dict[str, torch.Tensor | None], index: torch.Tensor) -> torch.Tensor:
    """Logits at the flat positions `index` (a layout's `before`): [len(index), V]."""
    if has_logit_transform(policy):
        return policy(**inputs, use_cache=False).logits.flatten(0, 1)[index]
    return policy.get_output_embeddings()(decoder_states(policy, inputs)[index])


def token_values(classifier: nn.Module, inputs: dict[str, torch.Tensor | None], index: torch.Tensor) -> torch.Tensor:
    """A `*ForSequenceClassification` model's scalar output at the flat positions `index`: [len(index)].

    Read through its head (`scalar_head`) at positions we choose (a layout's `before` for values,
    `last` for the reward), not where the model would guess padding starts: so a classifier whose
    config has no `pad_token_id` (GPT-2's) scores batches as well as single sequences."""
    return scalar_head(classifier)(decoder_states(classifier, inputs)[index]).squeeze(-1)


@torch.no_grad()
def packing_supported(model: nn.Module, pad_token_id: int) -> bool:
    """Whether `model` honours packed sequences (restarting position ids, no attention mask): three
    short sequences packed into two rows, the second holding two, must give the hidden states they
    give in padded rows. Several rows matter: transformers reads packed position ids as packing only
    in a one-row batch for some attention kernels (flash-attention), which a one-row check would
    miss. Deterministic tokens, no RNG draw (a resumed run must not see a different random stream)."""
    from ppoflow.packing import packed_layout, padded_layout

    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    tokens = (torch.arange(14, device=device) * 7 + 3) % vocab
    pad = tokens[:1].new_full((1,), pad_token_id)
    # prompt + response lengths 4 + 3, 3 + 1 and 2 + 1: rows of 7 tokens hold [A] and [B C]
    queries = torch.stack([tokens[:4], torch.cat([pad, tokens[4:7]]), torch.cat([pad, pad, tokens[7:9]])])
    query_mask = torch.tensor([[True] * 4, [False, True, True, True], [False, False, True, True]], device=device)
    responses = torch.stack([tokens[9:12], torch.cat([tokens[12:13], pad, pad]), torch.cat([tokens[13:14], pad, pad])])
    response_mask = torch.tensor([[True] * 3, [True, False, False], [True, False, False]], device=device)
    packed_rows = packed_layout(queries, query_mask, responses, response_mask, pad_token_id, row_tokens=7)
    assert packed_rows.input_ids.shape[0] == 2, "the self-check must pack several rows"
    states = []
    for layout in (padded_layout(queries, query_mask, responses, response_mask), packed_rows):
        index = torch.cat([layout.before, layout.last])
        states.append(decoder_states(model, layout.decoder_inputs())[index].float())
    padded, packed = states
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
    return bool((packed - padded).norm() <= tolerance * padded.norm())


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (its class is what a user recognises)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_packing(enabled: bool, models: dict[str, nn.Module | None], pad_token_id: int) -> bool:
    """`ppo.pack_sequences`, unless one of the models (by role) fails the packing self-check: then padded
    rows, with a warning naming it."""
    if not enabled:
        return False
    for role, model in models.items():
        if model is not None and not packing_supported(model, pad_token_id):
            log.warning(
                "models.%s: %s ignores packed position ids — using padded batches (slower); "
                "set ppo.pack_sequences: false to silence this",
                role,
                type(_unwrapped(model)).__name__,
            )
            return False
    return True
