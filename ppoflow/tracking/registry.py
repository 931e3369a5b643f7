"""Models from the MLflow Model Registry as model sources: `models:/NAME@ALIAS` and `models:/NAME/VERSION`.

A registry URI in `models.policy` (or `reward`, `value`, `ref`, `tokenizer`) is resolved against the
run's tracking store to one version (`resolve`), and that version's files are fetched once into the
run workspace as an ordinary Hugging Face directory (`fetch`): a logged transformers model keeps its
weights in `model/` and its tokenizer in `components/tokenizer/`; both end up side by side, so every
loader sees one directory with config, weights and tokenizer. An alias is read once, in stage 2: the
stage's manifest holds the version it found, so a retry or re-run of the same job keeps it even when
the alias moved meanwhile.

The engine imports this module only when a config names a registry URI (`ppoflow train` with local
models never loads MLflow).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from ppoflow.atomic import write_directory
from ppoflow.config import REGISTRY_URI
from ppoflow.errors import ConfigError, ModelError
from ppoflow.tracking.store import check_reachable, first_line, global_tracking_uri, resolve_tracking_uri

SCHEME = "models:/"
FETCHED = ".ppoflow-fetched"  # marker of a complete fetch: the version's URI


@dataclass(frozen=True)
class RegistryVersion:
    """One registered model version, as a source resolved from a URI."""

    name: str
    version: str
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.name}/{self.version}"


def parse(field: str, source: str) -> tuple[str, str | None, str | None]:
    """`(name, alias, version)` of a registry URI; a malformed one is refused naming `field`."""
    match = REGISTRY_URI.fullmatch(source)
    if match is None:
        raise ConfigError(
            field, f"{source!r} is not a registry URI", "write models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    return match["name"], match["alias"], match["version"]


def resolve(
    field: str, source: str, tracking_uri: str | None = None, *, unset_alias_ok: bool = False
) -> RegistryVersion | None:
    """The version `source` names now, from the tracking store (an alias is read, not followed later).
    `unset_alias_ok`: None, not an error, for an alias that points at no version (yet)."""
    name, alias, version = parse(field, source)
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        if (
            alias
            and unset_alias_ok
            and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
        ):
            return None
        what = f"alias {alias!r} of {name!r}" if alias else f"version {version} of {name!r}"
        raise ModelError(
            f"{field}: {source} does not resolve: no {what} in the registry of {uri.split('@')[-1]} "
            f"({first_line(exc)}) — register it, or point the field at a local directory or a Hub id"
        ) from None
    return RegistryVersion(name=found.name, version=str(found.version), run_id=found.run_id)


def fetch(field: str, version: RegistryVersion, root: Path, tracking_uri: str | None = None) -> Path:
    """The version's files as one Hugging Face directory under `root` (fetched once; reused after)."""
    target = Path(root) / f"{version.name}-v{version.version}"
    marker = target / FETCHED
    if marker.is_file() and marker.read_text() == version.uri:
        return target
    uri = resolve_tracking_uri(tracking_uri)

    def download(staging: Path) -> None:
        raw = staging.with_name(staging.name + ".download")
        shutil.rmtree(raw, ignore_errors=True)
        try:
            with global_tracking_uri(uri):  # the SQL registry resolves `models:/<id>` sources through it
                mlflow.artifacts.download_artifacts(artifact_uri=version.uri, dst_path=str(raw), tracking_uri=uri)
            _as_hf_directory(field, version, raw, staging)
        except MlflowException as exc:
            raise ModelError(
                f"{field}: could not download {version.uri} ({first_line(exc)}) — check the artifact store"
            ) from None
        finally:
            shutil.rmtree(raw, ignore_errors=True)
        (staging / FETCHED).write_text(version.uri)

    target.parent.mkdir(parents=True, exist_ok=True)
    write_directory(target, download)
    return target


def _as_hf_directory(field: str, version: RegistryVersion, raw: Path, out: Path) -> None:
    """A logged transformers model (`model/` + `components/*/`) or a plain model directory, flattened."""
    parts = (
        [raw / "model", *sorted((raw / "components").glob("*"))] if (raw / "model" / "config.json").is_file() else [raw]
    )
    if not (parts[0] / "config.json").is_file():
        raise ModelError(
            f"{field}: {version.uri} holds no Hugging Face model (no config.json in its artifacts) — "
            "register a model logged with mlflow.transformers or a directory saved with save_pretrained"
        )
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        for path in part.iterdir():
            if path.is_file() and not (out / path.name).exists():
                shutil.copy2(path, out / path.name)
