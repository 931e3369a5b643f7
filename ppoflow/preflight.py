"""Stage 1's checks of what the config names on this machine, before any expensive work: model sources
that exist and fit their role, data paths and partitions, files that must be text. Each refusal names
the field and the fix in one line (`ConfigError`)."""

from __future__ import annotations

from pathlib import Path

from ppoflow.config import CHAT_TEMPLATE_CHOICES, HUB_ID, MODEL_SOURCE_FIELDS, REGISTRY_URI, RunConfig, is_registry_uri
from ppoflow.errors import ConfigError
from ppoflow.partitions import is_glob, select_partitions


def check_model_source(field: str, source: str) -> None:
    """A local path must exist, a registry URI be well formed; anything else must look like a Hub id."""
    if is_registry_uri(source):
        if not REGISTRY_URI.fullmatch(source):
            raise ConfigError(
                field, f"{source!r} is not a registry URI", "write models:/NAME@ALIAS or models:/NAME/VERSION"
            )
        return
    if Path(source).expanduser().exists():
        return
    if not HUB_ID.fullmatch(source):
        raise ConfigError(
            field,
            f"{source!r} is neither an existing directory nor a Hub id",
            "fix the path (build the toy with `ppoflow toy --out DIR`)",
        )


def read_text_file(path: str | Path, field: str, fix: str) -> str:
    """A file the config names, as text: one that cannot be read, or is not UTF-8 text (a binary file,
    a gzip archive, another encoding), is refused naming the field."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            field, f"{path} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r})", fix
        ) from None
    except OSError as exc:
        raise ConfigError(field, f"{path} cannot be read ({exc.strerror or type(exc).__name__})", fix) from None


def validate_sources(config: RunConfig) -> None:
    """Cheap existence checks on every path the config names, before anything is loaded."""
    models = config.models
    if models.attn_implementation == "flash_attention_2":
        import importlib.util

        import torch

        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "models.attn_implementation",
                "flash_attention_2 needs a CUDA GPU and the flash-attn package, and this machine lacks "
                + ("a GPU" if not torch.cuda.is_available() else "flash-attn"),
                "use auto or sdpa here (or pip install flash-attn on a GPU machine)",
            )
    for field in MODEL_SOURCE_FIELDS:
        source = getattr(models, field)
        if source is not None:
            check_model_source(f"models.{field}", source)
    if models.policy_fallback is not None:
        match = REGISTRY_URI.fullmatch(models.policy)
        if match is None or match["alias"] is None or is_registry_uri(models.policy_fallback):
            raise ConfigError(
                "models.policy_fallback",
                "is only for a models.policy of the form models:/NAME@ALIAS, and must be a local directory or Hub id",
                "remove it, or point models.policy at a registry alias",
            )
    data_path = config.data.path
    select_partitions(data_path, config.data.window)  # a glob matching nothing, unordered names, a window on one file
    if not is_glob(data_path) and not Path(data_path).expanduser().exists() and not HUB_ID.fullmatch(data_path):
        raise ConfigError(
            "data.path",
            f"{data_path!r} does not exist",
            "point it at a JSONL/Parquet file, a saved dataset or a Hub id",
        )
    chat_template = config.data.chat_template
    if chat_template not in CHAT_TEMPLATE_CHOICES:
        if not Path(chat_template).expanduser().is_file():
            raise ConfigError(
                "data.chat_template",
                f"{chat_template!r} is not a file",
                "point it at a Jinja chat template file, or set it to auto or none",
            )
        read_text_file(chat_template, "data.chat_template", "point it at a Jinja chat template file (UTF-8 text)")
    if config.peft.enabled and models.ref is not None:
        raise ConfigError(
            "models.ref",
            "is set while peft.enabled is true",
            "remove it: with LoRA the base model with the adapter disabled is the reference",
        )
    if config.ppo.stop_token_id is not None and config.ppo.stop_token is not None:
        raise ConfigError("ppo.stop_token_id", "is set together with ppo.stop_token", "set only one of them")
