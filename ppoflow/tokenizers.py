"""The run's tokenizers: the policy's, shared by policy, reference and value, and the reward model's
own when it has another; their identity, pad token and the value model's source that follows."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from ppoflow.config import CHAT_TEMPLATE_CHOICES, RunConfig
from ppoflow.errors import ModelError
from ppoflow.manifests import ModelSource
from ppoflow.sources import resolve_source

log = logging.getLogger(__name__)


PROBE_TEXT = "Hello, World! 123 probe"


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what a tokenizer does to text: its vocabulary, its special tokens (the pad token
    aside: ppoflow sets one where it is missing, and padding never reaches a model input), and the
    ids it gives a probe text (normalising, adding BOS/EOS). Equal digests tokenize alike."""
    special = {name: str(token) for name, token in tokenizer.special_tokens_map.items() if name != "pad_token"}
    identity = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": special,
        "probe": list(tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def prepare_tokenizers(
    config: RunConfig, sources: dict[str, ModelSource | None], out_dir: Path, reward_out_dir: Path
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase | None]:
    """The policy's tokenizer (left padding, a pad token set) saved to `out_dir`, and the reward
    model's own when it tokenizes differently (vocabulary, special tokens, encoding or chat
    template), saved to `reward_out_dir`; None when the reward model shares the policy's, which then
    scores the policy's tokens as they are.

    A missing pad token becomes the UNK token when there is one (so pad != EOS and no embedding
    resize is needed); only as a last resort is EOS reused, which the rollout handles because it
    finds response ends by the stop token, not by padding.
    """
    models = config.models
    policy_dir = sources["policy"].local_dir
    tokenizer_dir = resolve_source("tokenizer", models.tokenizer, models.revision) if models.tokenizer else policy_dir
    tokenizer = _load_tokenizer("tokenizer" if models.tokenizer else "policy", tokenizer_dir, models.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"models.{'tokenizer' if models.tokenizer else 'policy'}: the tokenizer "
            "has no EOS token — set eos_token in its tokenizer_config.json"
        )
    _set_pad_token("policy", tokenizer)
    vocab_size = AutoConfig.from_pretrained(policy_dir, trust_remote_code=models.trust_remote_code).vocab_size
    if len(tokenizer) > vocab_size:
        raise ModelError(
            f"models.policy: the tokenizer has {len(tokenizer)} tokens but the model "
            f"only {vocab_size} embeddings — use the tokenizer the model was trained with"
        )
    reward_tokenizer = _load_tokenizer("reward", sources["reward"].local_dir, models.trust_remote_code)
    shared = same_tokenizer(reward_tokenizer, tokenizer)
    # A template file given for the prompts (data.chat_template) goes with the tokenizer, so that the
    # released policy (final/) renders conversations as it was trained to. Set after the comparison:
    # the reward model scores the policy's tokens as they are when the tokenizers themselves agree.
    if config.data.chat_template not in CHAT_TEMPLATE_CHOICES:
        tokenizer.chat_template = Path(config.data.chat_template).expanduser().read_text()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    if shared:
        return tokenizer, None
    log.info("models.reward has its own tokenizer: each prompt + response is re-encoded with it for scoring")
    _set_pad_token("reward", reward_tokenizer)
    reward_out_dir.mkdir(parents=True, exist_ok=True)
    reward_tokenizer.save_pretrained(reward_out_dir)
    return tokenizer, reward_tokenizer


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers turn text and conversations into the same ids."""
    return tokenizer_identity(a) == tokenizer_identity(b) and a.chat_template == b.chat_template


def settle_value_source(
    config: RunConfig,
    sources: dict[str, ModelSource | None],
    tokenizer: PreTrainedTokenizerBase,
    *,
    reward_has_own_tokenizer: bool,
) -> ModelSource:
    """Where the value model starts. It reads the policy's tokens (one value per response token), so
    with `models.value: null` and a reward model of another tokenizer it starts from the policy
    checkpoint (its decoder, a fresh scalar head); a value checkpoint must share the policy's tokenizer."""
    value, policy = sources["value"], sources["policy"]
    if config.models.value is None and reward_has_own_tokenizer:
        log.info(
            "models.value is null and models.reward has its own tokenizer: the value model starts from the policy "
            "checkpoint (its decoder and a fresh scalar head)"
        )
        return policy.model_copy(update={"role": "value"})
    if value.local_dir != policy.local_dir:
        _check_value_tokenizer(config, value, tokenizer)
    return value


def _check_value_tokenizer(config: RunConfig, value: ModelSource, tokenizer: PreTrainedTokenizerBase) -> None:
    value_tokenizer = _load_tokenizer("value", value.local_dir, config.models.trust_remote_code)
    # token ids only: it renders no conversation
    if tokenizer_identity(value_tokenizer) != tokenizer_identity(tokenizer):
        raise ModelError(
            f"models.value: {value.source} has another tokenizer than the policy, but the value model reads the "
            "policy's tokens — start it from a checkpoint with the policy's tokenizer (the SFT policy itself works), "
            "or leave models.value null"
        )


def _set_pad_token(role: str, tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            log.warning("models.%s: the tokenizer has no pad or unk token: padding with EOS", role)
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ModelError(
                f"models.{role}: the tokenizer has no pad, unk or EOS token "
                "to pad with — set pad_token in its tokenizer_config.json"
            )
    tokenizer.padding_side = "left"


def _load_tokenizer(field: str, directory: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(
            f"models.{field}: no usable tokenizer in {directory} "
            f"({type(exc).__name__}) — save the tokenizer beside the model"
        ) from None


def load_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """The prepared tokenizer of stage 2 (left padding, pad token set)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"
    return tokenizer
