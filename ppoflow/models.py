"""Loading the four models: policy, value, the frozen reference and reward model, the released policy;
every dropout off; LoRA on the policy. Where they come from is `ppoflow.sources`, their tokenizers
`ppoflow.tokenizers`, what a forward reads of them `ppoflow.forwards`.

The reward and value models are `*ForSequenceClassification` heads on a decoder backbone; their
per-token scores come from the backbone's hidden states through the scalar head (`score`, CTRL's
`classifier`), so the reward is read at the last real token we choose (not where the model guesses
padding starts) and the value model gives one value per response token.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
)

from ppoflow.config import PeftConfig, RunConfig
from ppoflow.errors import ModelError
from ppoflow.manifests import ModelManifest


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it, fp32 otherwise (bf16 is slow on CPUs without AMX)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Names of the settings that make a training-mode forward random: dropout probabilities in every
# spelling (`attention_dropout`, GPT-2's `attn_pdrop`, OPT's `layerdrop`, `drop_path_rate`) and MoE
# routers' `router_jitter_noise`. Every numeric field of transformers 5.24's config classes that
# matches is one of those.
_STOCHASTIC_SETTING = re.compile(r"drop|jitter", re.IGNORECASE)


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio must be 1 on the first pass over fresh rollouts, and the trainer runs its forward in
    training mode: no dropout anywhere, whatever form it takes. Zeroes `nn.Dropout` modules (LoRA's
    `lora_dropout` among them), the floats modules cached from their config at init and apply as
    functional dropout when `self.training` (Llama's `attention_dropout`, OPT's `dropout` and
    `layerdrop`), and the config fields themselves, which some families read at forward time (Falcon,
    GPT-Neo); saved checkpoints therefore record dropout 0, as the weights were trained. Call it once
    the model is complete (after a LoRA adapter is added or loaded)."""
    configs = {}
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, PreTrainedConfig):
                configs[id(value)] = value
            elif _is_stochastic_setting(name, value):
                setattr(module, name, 0.0)
    for config in configs.values():
        for name, value in list(vars(config).items()):
            if _is_stochastic_setting(name, value):
                setattr(config, name, 0.0)


def _is_stochastic_setting(name: str, value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value != 0
        and bool(_STOCHASTIC_SETTING.search(name))
    )


def _on_device(device: torch.device | None) -> dict[str, Any]:
    """from_pretrained arguments that put the weights straight on `device` as they are read (one
    device, so transformers adds no dispatch hooks), instead of a full copy in host RAM first."""
    return {} if device is None else {"device_map": {"": torch.device(device)}}


def _load(
    auto_class,
    directory: Path,
    dtype: torch.dtype,
    trust_remote_code: bool,
    attn_implementation: str | None,
    device: torch.device | None,
    **extra: Any,
) -> PreTrainedModel:
    """A model from a local Hugging Face directory, safetensors only, dropout off."""
    model = auto_class.from_pretrained(
        directory,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        attn_implementation=attn_implementation,
        **extra,
        **_on_device(device),
    )
    disable_dropout(model)
    return model


def load_causal_lm(
    directory: Path,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device: torch.device | None = None,
) -> PreTrainedModel:
    return _load(AutoModelForCausalLM, directory, dtype, trust_remote_code, attn_implementation, device)


def load_classifier(
    directory: Path,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """A decoder classifier with one label: a score at every position (`scalar_head`)."""
    model = _load(
        AutoModelForSequenceClassification,
        directory,
        dtype,
        trust_remote_code,
        attn_implementation,
        device,
        num_labels=1,
    )
    if scalar_head(model) is None:
        raise ModelError(
            f"{directory}: {type(model).__name__} has no head that scores each position (a `score` head, or a linear "
            "`classifier` without a pooler) — ppoflow needs a decoder classifier such as LlamaForSequenceClassification"
        )
    return model


def scalar_head(classifier: nn.Module) -> nn.Module | None:
    """The head a decoder classifier applies to each position's hidden state: `score` (the
    transformers convention: Llama, GPT-2, GPT-NeoX, OPT, Gemma, Phi-3...) or a linear `classifier`
    (CTRL). None for anything else: a head with layers of its own, or an encoder's `classifier`,
    which reads a pooled first token (BERT, DeBERTa: a `pooler` module), not each position."""
    head = getattr(classifier, "score", None)
    if isinstance(head, nn.Module):
        return head
    head = getattr(classifier, "classifier", None)
    pooled = any(name.rsplit(".", 1)[-1] == "pooler" for name, _ in classifier.named_modules())
    return head if isinstance(head, nn.Linear) and not pooled else None


# The run's models are loaded through the three functions below, by training and by evaluation
# alike: trust_remote_code and attention kernel of the run, safetensors only, dropout off, straight
# onto the process's device. Precision: what training updates (the policy's weights or its LoRA
# adapter, the value model) is kept in fp32 with its optimizer state, whatever `models.dtype` says
# (a bf16 weight of 0.02 does not move by a 3e-6 step); a LoRA base is stored in `models.dtype`, the
# reference and reward models in `models.frozen_dtype` (default `models.dtype`; they run in it);
# forwards compute in `models.dtype` through autocast (`RolloutWorker.autocast`).


def _load_options(config: RunConfig) -> tuple[torch.dtype, bool, str | None]:
    models = config.models
    return (
        resolve_dtype(models.dtype),
        models.trust_remote_code,
        None if models.attn_implementation == "auto" else models.attn_implementation,
    )


def frozen_dtype(config: RunConfig) -> torch.dtype:
    return resolve_dtype(config.models.frozen_dtype or config.models.dtype)


def load_policy(
    config: RunConfig,
    models: ModelManifest,
    checkpoint: Path | None,
    *,
    trainable: bool,
    device: torch.device | None = None,
) -> PreTrainedModel:
    """The policy at the start (`checkpoint` None) or of a checkpoint: full weights, or with LoRA the
    base model plus its adapter (a new one at the start)."""
    dtype, trust, attention = _load_options(config)
    if not config.peft.enabled:
        weights = torch.float32 if trainable else dtype
        return load_causal_lm(
            checkpoint / "policy" if checkpoint else models.policy.local_dir, weights, trust, attention, device
        )
    from peft import PeftModel

    # The frozen base in models.dtype, not frozen_dtype: its layers take the fp32 adapter's output,
    # which only autocast in models.dtype reconciles; peft keeps the adapter in fp32.
    base = load_causal_lm(models.policy.local_dir, dtype, trust, attention, device)
    if checkpoint is None:
        policy = add_lora(base, config.peft)
    else:
        policy = PeftModel.from_pretrained(base, checkpoint / "policy", is_trainable=trainable)
    disable_dropout(policy)
    return policy


def load_value(
    config: RunConfig, models: ModelManifest, checkpoint: Path | None, device: torch.device | None = None
) -> PreTrainedModel:
    """The value model at the start (from `models.value`) or of a checkpoint, in fp32 (it is trained)."""
    directory = checkpoint / "value" if checkpoint else models.value.local_dir
    _, trust, attention = _load_options(config)
    return load_classifier(directory, torch.float32, trust, attention, device)


def load_released(config: RunConfig, directory: Path, device: torch.device) -> PreTrainedModel:
    """A released policy (a full Hugging Face directory: `final/`, a registry version), frozen on
    `device` in `models.dtype`, as the trained policy is evaluated."""
    dtype, trust, attention = _load_options(config)
    return load_causal_lm(directory, dtype, trust, attention, device).requires_grad_(False).eval()


def load_frozen(
    config: RunConfig, models: ModelManifest, device: torch.device
) -> tuple[PreTrainedModel | None, PreTrainedModel]:
    """The reference (None with LoRA: the policy with its adapter off) and the reward model, frozen on `device`."""
    _, trust, attention = _load_options(config)
    options = (frozen_dtype(config), trust, attention, device)
    ref = None if models.ref is None else load_causal_lm(models.ref.local_dir, *options)
    reward = load_classifier(models.reward.local_dir, *options)
    return tuple(None if model is None else model.requires_grad_(False).eval() for model in (ref, reward))


def add_lora(policy: PreTrainedModel, peft: PeftConfig) -> PreTrainedModel:
    """Wrap the policy with a LoRA adapter; a target module missing from the model is an error.

    `all-linear` is peft's: every `nn.Linear` and GPT-2-style `Conv1D` layer but the LM head, so
    fused projections (GPT-NeoX's `query_key_value`, Phi-3's `qkv_proj`, GPT-2's `c_attn`) are
    adapted whole. GPT-2's `Conv1D` stores its weight transposed: peft is told (`fan_in_fan_out`)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    adaptable = {
        name.rsplit(".", 1)[-1]: module
        for name, module in policy.named_modules()
        if isinstance(module, nn.Linear | Conv1D)
    }
    if peft.target_modules != "all-linear":
        names = {name.rsplit(".", 1)[-1] for name, _ in policy.named_modules()}
        missing = [target for target in peft.target_modules if target not in names]
        if missing:
            raise ModelError(
                f"peft.target_modules: {missing} not found in the policy "
                f"— choose among {sorted(adaptable)} or 'all-linear'"
            )
    lora = LoraConfig(
        r=peft.r,
        lora_alpha=peft.lora_alpha,
        lora_dropout=0.0,  # as every dropout: PPO's first ratio must be 1 (no peft.lora_dropout setting)
        target_modules=peft.target_modules,
        fan_in_fan_out=any(isinstance(module, Conv1D) for module in adaptable.values()),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(policy, lora)
