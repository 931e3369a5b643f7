"""Stage 2: find, fingerprint and load the four models and the shared tokenizer.

The reward and value models are `*ForSequenceClassification` heads on a decoder backbone; their
per-token scores come from the backbone's hidden states through the scalar head (`score`, CTRL's
`classifier`), so the reward is read at the last real token we choose (not where the model guesses
padding starts) and the value model gives one value per response token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from ppoflow.config import CHAT_TEMPLATE_CHOICES, ModelsConfig, PeftConfig, RunConfig, is_registry_uri
from ppoflow.errors import ModelError
from ppoflow.hashing import sha256_tree
from ppoflow.manifests import ModelManifest, ModelSource

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.txt")


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it, fp32 otherwise (bf16 is slow on CPUs without AMX)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def resolve_source(field: str, source: str, revision: str | None) -> Path:
    """A local directory as is, or a Hub id downloaded (or found in the cache when offline)."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise ModelError(f"models.{field}: {source} is a file, not a model directory — point it at the directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=list(WEIGHT_PATTERNS)))
    except Exception as exc:  # the Hub client raises many types; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only cached models can be used)" if offline else ""
        raise ModelError(
            f"models.{field}: {source!r} is not a local directory and could not be fetched from the Hub{hint}: "
            f"{type(exc).__name__} — use a local path or a reachable Hub id"
        ) from None


def count_parameters(field: str, model_dir: Path) -> int:
    """Parameter count read from the safetensors headers, without loading the weights."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"models.{field}: {model_dir} has no .safetensors weights — ppoflow loads safetensors only "
            "(re-save the model with save_pretrained(..., safe_serialization=True))"
        )
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                numel = 1
                for size in handle.get_slice(name).get_shape():
                    numel *= size
                total += numel
    return total


def role_classes(config: PreTrainedConfig, *, classifier: bool) -> set[str]:
    """The class names `AutoModelForCausalLM` (or, for a classifier, `AutoModelForSequenceClassification`)
    loads for `config`: transformers' own for its model_type (GPT-2's causal LM is `GPT2LMHeadModel`),
    or the one its remote code names in `auto_map`. A checkpoint fits a role when its `architectures`
    name one of them: its weights are that class's, head included."""
    mapping = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if classifier else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    mapped = mapping.get(config.model_type) or ()
    names = {mapped} if isinstance(mapped, str) else set(mapped)
    remote = (getattr(config, "auto_map", None) or {}).get(
        "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    )
    if remote:
        names.add(remote.rsplit(".", 1)[-1])
    return names


def describe_source(
    role: str,
    field: str,
    source: str,
    revision: str | None,
    *,
    classifier: bool,
    trust_remote_code: bool,
    or_causal_lm: bool = False,
) -> ModelSource:
    """Locate a model, check it fits its role from its config alone, and fingerprint its files.
    `or_causal_lm`: a classifier role that a causal LM may start too (the value model: its decoder
    with a fresh scalar head)."""
    local_dir = resolve_source(field, source, revision)
    try:
        config = AutoConfig.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(
            f"models.{field}: {local_dir} has no readable config.json "
            f"({type(exc).__name__}) — is it a Hugging Face model directory?"
        ) from None
    architectures = config.architectures or []
    if or_causal_lm and role_classes(config, classifier=False).intersection(architectures):
        classifier = False
    auto_class = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    expected = role_classes(config, classifier=classifier)
    if not expected.intersection(architectures):
        loads = (
            f"{auto_class} loads {sorted(expected)} for model_type {config.model_type!r}"
            if expected
            else (f"{auto_class} has no class for model_type {config.model_type!r}")
        )
        raise ModelError(
            f"models.{field}: {source} is a {architectures or 'model of unknown class'}, not a "
            f"{'sequence classifier' if classifier else 'causal LM'} ({loads}) — use an {auto_class} checkpoint"
            f"{' with num_labels=1' if classifier else ''}"
        )
    if classifier and config.num_labels != 1:
        raise ModelError(
            f"models.{field}: {source} has num_labels={config.num_labels} — a reward/value model needs num_labels=1"
        )
    return ModelSource(
        role=role,
        source=source,
        revision=revision,
        local_dir=local_dir,
        sha256=sha256_tree(local_dir, WEIGHT_PATTERNS),
        model_class=architectures[0],
        num_parameters=count_parameters(field, local_dir),
    )


def describe_models(models: ModelsConfig, peft: PeftConfig) -> dict[str, ModelSource | None]:
    """Provenance of policy, reference (none with LoRA), reward and value models."""
    common = {"revision": models.revision, "trust_remote_code": models.trust_remote_code}
    policy = describe_source("policy", "policy", models.policy, classifier=False, **common)
    reward = describe_source("reward", "reward", models.reward, classifier=True, **common)
    if peft.enabled:
        ref = None
    elif models.ref is None or models.ref == models.policy:
        ref = policy.model_copy(update={"role": "ref"})
    else:
        ref = describe_source("ref", "ref", models.ref, classifier=False, **common)
    if models.value is None or models.value == models.reward:
        value = reward.model_copy(update={"role": "value"})
    else:
        value = describe_source("value", "value", models.value, classifier=True, or_causal_lm=True, **common)
    return {"policy": policy, "ref": ref, "reward": reward, "value": value}


REGISTRY_FIELDS = ("policy", "reward", "value", "ref", "tokenizer")


def pin_registry_sources(models: ModelsConfig, root: Path) -> tuple[ModelsConfig, dict[Path, tuple[str, str]]]:
    """Registry URIs (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) resolved to one version each and
    fetched under `root`: the models config with those local directories in their place (two fields
    naming one URI get one directory), and for each directory the URI configured and the version
    (`models:/NAME/VERSION`) it resolved to."""
    wanted = {
        getattr(models, field): field for field in reversed(REGISTRY_FIELDS) if is_registry_uri(getattr(models, field))
    }
    if not wanted:
        return models, {}
    from ppoflow.tracking import registry  # MLflow: only for configs that name the registry

    local: dict[str, str] = {}
    pinned: dict[Path, tuple[str, str]] = {}
    for uri, field in wanted.items():
        fallback = models.policy_fallback if uri == models.policy else None
        version = registry.resolve(f"models.{field}", uri, unset_alias_ok=fallback is not None)
        if version is None:
            log.info(
                "models.%s: %s points at no version yet: starting from models.policy_fallback %s", field, uri, fallback
            )
            local[uri] = fallback
            continue
        directory = registry.fetch(f"models.{field}", version, root)
        local[uri] = str(directory)
        pinned[directory] = (uri, version.uri)
        log.info("models.%s: %s is %s", field, uri, version.uri)
    update = {field: local[getattr(models, field)] for field in REGISTRY_FIELDS if getattr(models, field) in local}
    return models.model_copy(update=update), pinned


def restore_registry_sources(
    sources: dict[str, ModelSource | None], pinned: dict[Path, tuple[str, str]]
) -> dict[str, ModelSource | None]:
    """The described sources with the registry URI each was configured as, and the version it resolved to."""
    restored = dict(sources)
    for role, source in sources.items():
        if source is not None and source.local_dir in pinned:
            configured, resolved = pinned[source.local_dir]
            restored[role] = source.model_copy(update={"source": configured, "registry_uri": resolved})
    return restored


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


def load_causal_lm(
    directory: Path,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device: torch.device | None = None,
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        attn_implementation=attn_implementation,
        **_on_device(device),
    )
    disable_dropout(model)
    return model


def load_classifier(
    directory: Path,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device: torch.device | None = None,
) -> PreTrainedModel:
    model = AutoModelForSequenceClassification.from_pretrained(
        directory,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        num_labels=1,
        attn_implementation=attn_implementation,
        **_on_device(device),
    )
    disable_dropout(model)
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
