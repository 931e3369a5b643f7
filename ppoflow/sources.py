"""Where the four models come from: sources resolved (local, Hub, registry pins), fingerprinted and
checked for their role (causal LM or one-label classifier), before any weights are loaded."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from safetensors import safe_open
from transformers import (
    AutoConfig,
    PreTrainedConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from ppoflow.config import ModelsConfig, PeftConfig, is_registry_uri
from ppoflow.errors import ModelError
from ppoflow.hashing import sha256_tree
from ppoflow.manifests import ModelSource

log = logging.getLogger(__name__)


WEIGHT_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.txt")


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
