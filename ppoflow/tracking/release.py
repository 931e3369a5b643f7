"""The release of a run: eval artifacts and metrics, the policy as a logged model, its registry version and alias.

`check_release_names` refuses a registered model name or alias MLflow would refuse, before anything
is trained. `log_release` finds the version the run already registered for the same weights (a
retried release stage) before registering a new one, and lists the version on its logged model.
`describe_release`, last in stage 6 (after the promotion gate), writes the markdown descriptions
of the run and the registered version.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS, MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from ppoflow.config import TrackingConfig
from ppoflow.errors import TrackingError
from ppoflow.manifests import DatasetManifest, ModelManifest, Release
from ppoflow.provenance import library_versions
from ppoflow.redaction import redact
from ppoflow.tracking.metrics import MetricsSink, is_number
from ppoflow.tracking.run import CONFIG_HASH_TAG, FLOW_RUN_IDS_TAG, TrackingRun
from ppoflow.tracking.store import first_line, global_tracking_uri, in_batches
from ppoflow.workspace import SPOOL_FILE

if TYPE_CHECKING:
    import pandas

_LOGGER = logging.getLogger(__name__)

TRAINED_POLICY_SHA_TAG = (
    "ppoflow.trained_policy.sha256"  # the released weights (`ppoflow.policy.sha256`: the SFT input)
)
LEGACY_POLICY_SHA_TAG = "ppoflow.policy_sha256"  # the same, on versions registered before the rename: still read
INPUT_POLICY_SHA_TAG = "ppoflow.policy.sha256"  # the policy training started from (`TrackingRun.log_models`)
POLICY_SOURCE_TAG = (
    "ppoflow.policy_source"  # what the version's policy started from: models:/NAME/VERSION, a path, a Hub id
)
# Each plot: key groups, one y axis each (the second on the right); a key ending in "/" stands for
# every key with that prefix (`reward/<name>`: each reward function's mean score).
PLOTS = {
    "reward": (("objective/scores", "objective/rlhf_reward", "reward/"),),
    "kl": (("objective/kl",),),
    "losses": (("loss/policy_avg",), ("loss/value_avg",)),  # own axes: the value loss dwarfs the policy loss
    "eval": (("eval/reward_policy", "eval/reward_ref"), ("eval/win_rate",)),  # the updates ppo.eval_every evaluated
}


def check_release_names(tracking: TrackingConfig) -> None:
    """Refuse a registered model name or alias that MLflow would refuse, before anything is trained
    or written (MLflow itself would only say so at registration, after the whole run)."""
    if not tracking.log_model:
        return
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
        _validate_model_name,
    )

    alias_rules = (_validate_model_alias_name, _validate_model_alias_name_reserved)
    checks = [
        ("tracking.registered_model_name", tracking.registered_model_name, (_validate_model_name,)),
        ("tracking.alias", tracking.alias, alias_rules),
    ]
    if tracking.promotion is not None:
        checks.append(("tracking.promotion.alias", tracking.promotion.alias, alias_rules))
    for field, value, validators in checks:
        for validate in validators:
            try:
                validate(value)
            except MlflowException as exc:
                raise TrackingError(
                    f"config field `{field}`: MLflow refuses {value!r} ({first_line(exc)}) — choose another name"
                ) from None


def log_release(
    run: TrackingRun,
    release: Release,
    *,
    samples: pandas.DataFrame,
    metrics_history: list[dict],
    eval_report: dict,
    policy_dir: Path,
    registered_model_name: str,
    alias: str,
    log_model: bool,
    policy_source: str,
) -> Release:
    """Artifacts (samples table, plots, eval report), `eval/*` metrics, and (with `log_model`) the
    policy as an MLflow logged model registered under `registered_model_name` with `alias`, tagged
    with `policy_source` (what the policy started from: a registry version, a path or a Hub id).
    A retried release finds the version this run already registered for the same weights."""
    _deliver_spooled_metrics(run)
    run.set_tags({TRAINED_POLICY_SHA_TAG: release.policy_sha256})
    version = None
    if log_model:
        _check_model_dir(Path(policy_dir))
        version = _registered_version(run, registered_model_name, release.policy_sha256)
        if version is None:
            _create_registered_model(run, registered_model_name)  # a refused name fails before any work
    run.client.log_table(run.run_id, samples, "eval/samples.json")
    run.client.log_text(run.run_id, samples.to_csv(index=False), "eval/samples.csv")
    run.client.log_dict(run.run_id, eval_report, "eval/eval.json")
    for name, groups in PLOTS.items():
        figure = _plot(metrics_history, groups, name)
        if figure is not None:
            run.client.log_figure(run.run_id, figure, f"plots/{name}.png")
    last_update = max((int(row.get("update", 0)) for row in metrics_history), default=0)
    numeric = {key: float(value) for key, value in eval_report.items() if is_number(value)}
    _log_metrics_once(run, {f"eval/{key}": value for key, value in numeric.items()}, last_update)
    filled = release.model_copy(update={"mlflow_run_id": run.run_id})
    if not log_model:
        return filled
    if version is None:
        model_id = _log_policy(run, Path(policy_dir), release, last_update)
        version = _register(run, registered_model_name, model_id, release, numeric, policy_source)
    else:
        _LOGGER.info(
            "policy %s is already version %s of %s", release.policy_sha256[:12], version.version, registered_model_name
        )
    model_id = _logged_model_id(version)
    if model_id:  # also on a retry: the earlier attempt may have died before linking
        _link_logged_model(run, model_id, registered_model_name, str(version.version))
    set_alias(run, "tracking.alias", registered_model_name, alias, str(version.version))
    model_uri = (
        version.source
        if version.source.startswith("models:/")
        else f"models:/{registered_model_name}/{version.version}"
    )
    run.set_tags(
        {"ppoflow.model_uri": model_uri, "ppoflow.registered_model": f"{registered_model_name}/{version.version}"}
    )
    return filled.model_copy(
        update={
            "model_uri": model_uri,
            "registered_model": registered_model_name,
            "registered_version": str(version.version),
        }
    )


MAX_DESCRIPTION = 5000  # the SQL registry's description column
SHOWN_PARTITIONS = 20  # the newest partitions listed in the run's description


def describe_release(run: TrackingRun, release: Release, models: ModelManifest, data: DatasetManifest) -> None:
    """Markdown descriptions once the release is decided (after the promotion gate): the run's
    (`mlflow.note.content`: config hash, the four models, data digests, Prefect flow runs, version
    and decision), the registered version's (what it is and where it came from), and the registered
    model's when it has none."""
    tags = run.client.get_run(run.run_id).data.tags
    lines = [f"# PPO run `{tags.get(CONFIG_HASH_TAG, '')}`", "", f"Config hash `{tags.get(CONFIG_HASH_TAG, '')}`.", ""]
    lines += _models_table(models) + [""] + _data_lines(data) + [""]
    flow_runs = [item for item in tags.get(FLOW_RUN_IDS_TAG, "").split(",") if item]
    if flow_runs:
        lines += ["## Prefect flow runs", ""]
        for flow_run_id in flow_runs:
            about = json.loads(tags.get(f"prefect.flow_run.{flow_run_id}", "{}"))
            name = f" {about['name']}" if about.get("name") else ""
            deployment = f" (deployment {about['deployment']})" if about.get("deployment") else ""
            link = f": {about['url']}" if about.get("url") else ""
            lines.append(f"- `{flow_run_id}`{name}{deployment}{link}")
        lines.append("")
    lines += ["## Release", "", *_release_lines(release)]
    run.set_tags({MLFLOW_RUN_NOTE: "\n".join(lines) + "\n"})
    if not release.registered_model:
        return
    version = [
        f"PPO policy trained by ppoflow in MLflow run `{run.run_id}` (config hash `{tags.get(CONFIG_HASH_TAG, '')}`).",
        "",
        f"- trained weights sha256 `{release.policy_sha256}`",
        f"- started from `{redact(models.policy.registry_uri or models.policy.source)}` "
        f"(sha256 `{models.policy.sha256}`)",
        f"- reward model `{redact(models.reward.registry_uri or models.reward.source)}` "
        f"(sha256 `{models.reward.sha256}`)",
        f"- prompts `{redact(data.source)}`: train digest `{data.train_digest}`, eval digest `{data.eval_digest}`"
        + (f", {len(data.partitions)} partitions ({_partition_range(data)})" if data.partitions else ""),
        "- eval against the reference: "
        + ", ".join(
            f"{key} {release.eval_metrics[key]:.4g}"
            for key in ("win_rate", "reward_policy", "reward_ref", "kl")
            if key in release.eval_metrics
        ),
    ]
    if release.promotion:
        version.append(f"- promotion gate (@{release.promotion['alias']}): {release.promotion['decision']}")
    run.client.update_model_version(
        release.registered_model, release.registered_version, description="\n".join(version)[:MAX_DESCRIPTION]
    )
    if not run.client.get_registered_model(release.registered_model).description:
        run.client.update_registered_model(
            release.registered_model,
            description="PPO policies trained by ppoflow (RLHF). Each version names its MLflow run, the models and "
            "data it was trained from, its evaluation and the promotion gate's decision.",
        )


def _models_table(models: ModelManifest) -> list[str]:
    lines = ["## Models", "", "| role | source | sha256 | registry version |", "|---|---|---|---|"]
    for role, model in models.roles().items():
        if model is None:
            lines.append(f"| {role} | the policy with the LoRA adapter disabled | | |")
        else:
            lines.append(
                f"| {role} | `{redact(model.source)}` | `{model.sha256}` | "
                f"{f'`{model.registry_uri}`' if model.registry_uri else '—'} |"
            )
    return lines


def _data_lines(data: DatasetManifest) -> list[str]:
    lines = [
        "## Data",
        "",
        f"Prompts `{redact(data.source)}` (fingerprint `{data.fingerprint}`): {data.train_rows} "
        f"train, digest `{data.train_digest}`; {data.eval_rows} eval, digest `{data.eval_digest}`.",
    ]
    if data.partitions:
        shown = data.partitions[-SHOWN_PARTITIONS:]
        lines += [
            "",
            f"Partitions ({len(data.partitions)}{', the newest shown' if len(shown) < len(data.partitions) else ''}):",
            "",
        ]
        lines += ["| partition | date | sha256 | rows |", "|---|---|---|---|"]
        lines += [
            f"| `{partition.path.name}` | {partition.date or '—'} | `{partition.sha256}` | {partition.rows} |"
            for partition in shown
        ]
    return lines


def _partition_range(data: DatasetManifest) -> str:
    first, last = data.partitions[0], data.partitions[-1]
    return f"{first.path.stem} … {last.path.stem}" if len(data.partitions) > 1 else first.path.stem


def _release_lines(release: Release) -> list[str]:
    lines = [f"Trained policy sha256 `{release.policy_sha256}`."]
    if release.registered_model:
        lines += [
            "",
            f"Registered model **{release.registered_model}** version "
            f"**{release.registered_version}** (`{release.model_uri}`).",
        ]
    else:
        lines += ["", "Not registered (`tracking.log_model: false`)."]
    if release.promotion:
        lines += ["", f"Promotion gate (@{release.promotion['alias']}): **{release.promotion['decision']}**."]
    if release.hub_commit_url:
        lines += ["", f"Pushed to the Hugging Face Hub: {release.hub_commit_url}"]
    return lines


def alias_holder(run: TrackingRun, name: str, alias: str) -> str | None:
    """The version `alias` points at, or None."""
    try:
        return str(run.client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def set_alias(run: TrackingRun, field: str, name: str, alias: str, version: str) -> None:
    """Point `alias` of registered model `name` at `version`; a refusal names the config `field`."""
    try:
        run.client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise TrackingError(
            f"config field `{field}`: MLflow refused alias {alias!r} ({first_line(exc)}) — "
            "use letters, digits, '_' or '-', not 'latest' or 'v<number>'"
        ) from None


def _deliver_spooled_metrics(run: TrackingRun, timeout: float = 60.0) -> None:
    """Training metrics still in the spool (MLflow was away when training ended and the sink's
    flush gave up) go out before the release: once training is finished (cached), no sink of
    the training stage is ever created again to re-read the spool."""
    if (run.output_dir / SPOOL_FILE).is_file():
        MetricsSink(run.client, run.run_id, run.output_dir / SPOOL_FILE).close(timeout)


def _log_metrics_once(run: TrackingRun, metrics: Mapping[str, float], step: int) -> None:
    """Log metric points whose (key, step) is not yet in the run."""
    fresh = []
    for key, value in metrics.items():
        if any(point.step == step for point in run.client.get_metric_history(run.run_id, key)):
            continue
        fresh.append(Metric(key, float(value), int(time.time() * 1000), step))
    for chunk in in_batches(fresh, MAX_METRICS_PER_BATCH):
        run.client.log_batch(run.run_id, metrics=chunk)


def _registered_version(run: TrackingRun, name: str, policy_sha256: str) -> Any:
    """A version this run already registered for the same policy weights (a retried release)."""
    try:
        versions = run.client.search_model_versions(f"name = '{name}' and run_id = '{run.run_id}'")
    except MlflowException:
        return None
    matching = [
        version
        for version in versions
        if policy_sha256 in (version.tags.get(TRAINED_POLICY_SHA_TAG), version.tags.get(LEGACY_POLICY_SHA_TAG))
    ]
    return max(matching, key=lambda version: int(version.version), default=None)


def _create_registered_model(run: TrackingRun, name: str) -> None:
    try:
        run.client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_ALREADY_EXISTS":
            return
        raise TrackingError(
            "config field `tracking.registered_model_name`: MLflow "
            f"refused {name!r} ({first_line(exc)}) — choose another name"
        ) from None


def _log_policy(run: TrackingRun, policy_dir: Path, release: Release, step: int) -> str:
    """The policy as an MLflow logged model of the run; returns its model id.

    MLflow 3.17 cannot log a transformers *directory* with transformers 5 (it reads
    `check_task(...)["impl"].__name__`, now a string), so the model and tokenizer are loaded and
    logged as components. The logged model is created here with the run's experiment (the flavor
    would otherwise put it in the default experiment), pip requirements are given (the flavor's
    default list asks for torchvision), and a local model card keeps it off the Hub. `step` links
    the run's metrics at that update (the final ones) to the logged model. The logged model gets the
    run's params (the config) and the hashes that identify it as its own params, once, at creation.
    """
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy_dir, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    logged_run = run.client.get_run(run.run_id)
    identity = {
        CONFIG_HASH_TAG: run.config_hash(),
        TRAINED_POLICY_SHA_TAG: release.policy_sha256,
        INPUT_POLICY_SHA_TAG: logged_run.data.tags.get(INPUT_POLICY_SHA_TAG),
    }
    identity = {key: value for key, value in identity.items() if value}
    logged = run.client.create_logged_model(
        run.experiment_id,
        name="policy",
        source_run_id=run.run_id,
        tags=identity,
        params={**logged_run.data.params, **identity},
    )
    card = ModelCard(
        f"---\ntags: [ppoflow, rlhf, ppo]\n---\n# PPO policy\n\nTrained by ppoflow, MLflow run {run.run_id}.\n"
    )
    with global_tracking_uri(run.tracking_uri):
        mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer},
            name="policy",
            task="text-generation",
            run_id=run.run_id,
            model_id=logged.model_id,
            model_card=card,
            pip_requirements=_pip_requirements(),
            step=step,
        )
    return logged.model_id


def _register(
    run: TrackingRun, name: str, model_id: str, release: Release, eval_metrics: Mapping[str, float], policy_source: str
) -> Any:
    tags = {f"eval.{key}": repr(value) for key, value in eval_metrics.items()}
    tags |= {
        CONFIG_HASH_TAG: run.config_hash(),
        TRAINED_POLICY_SHA_TAG: release.policy_sha256,
        POLICY_SOURCE_TAG: redact(policy_source),
    }
    # The SQL registry resolves a `models:/<id>` source through the process-wide tracking URI.
    with global_tracking_uri(run.tracking_uri):
        version = run.client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run.run_id, model_id=model_id, tags=tags
        )
    _LOGGER.info("registered %s version %s (run %s)", name, version.version, run.run_id)
    return version


def _logged_model_id(version: Any) -> str | None:
    """The logged model a version was registered from: the SQL registry keeps no `model_id`, only
    the source `models:/<model_id>`."""
    if version.model_id:
        return version.model_id
    rest = version.source.removeprefix("models:/") if version.source.startswith("models:/") else ""
    return rest if rest and "/" not in rest else None


def _link_logged_model(run: TrackingRun, model_id: str, name: str, version: str) -> None:
    """List the version on its logged model (`mlflow.modelVersions`, as `mlflow.register_model` does;
    `create_model_version` alone leaves the logged model's page saying "Not registered")."""
    entry = {"name": name, "version": version}
    known = run.client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    entries = json.loads(known) if known else []
    if entry not in entries:
        run.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*entries, entry])})


def _check_model_dir(policy_dir: Path) -> None:
    if not (policy_dir / "config.json").is_file():
        raise TrackingError(
            f"{policy_dir} is not a full Hugging Face model directory (no config.json; a LoRA adapter?) — "
            "log the merged model (peft.merge_on_save: true) or set tracking.log_model: false"
        )


def _pip_requirements() -> list[str]:
    versions = library_versions()
    return [
        f"{name}=={versions[name]}"
        for name in ("transformers", "torch", "tokenizers", "accelerate")
        if name in versions
    ]


def _plot(history: list[dict], groups: tuple[tuple[str, ...], ...], title: str) -> Any:
    """A line plot over updates with one y axis per key group (`PLOTS`), or None when no key has
    data. Uses the Agg canvas through `matplotlib.figure.Figure` (no pyplot: no global figure state
    shared between threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = sorted({key for row in history for key in row})
    expanded = [
        [
            found
            for key in group
            for found in ([k for k in present if k.startswith(key)] if key.endswith("/") else [key])
        ]
        for group in groups
    ]
    series = [[(key, points) for key in group if (points := _points(history, key))] for group in expanded]
    series = [group for group in series if group]
    if not series:
        return None
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    first = figure.add_subplot()
    lines = []
    for index, group in enumerate(series):
        axes = first if index == 0 else first.twinx()
        color_offset = sum(len(earlier) for earlier in series[:index])
        for number, (key, points) in enumerate(group):
            lines += axes.plot(*zip(*points, strict=True), marker=".", label=key, color=f"C{color_offset + number}")
        if len(series) > 1:
            axes.set_ylabel(", ".join(key for key, _ in group))
    first.set_xlabel("update")
    first.set_title(title)
    first.grid(alpha=0.3)
    first.legend(lines, [line.get_label() for line in lines])
    return figure


def _points(history: list[dict], key: str) -> list[tuple[Any, float]]:
    return [
        (row.get("update", index), float(row[key]))
        for index, row in enumerate(history)
        if is_number(row.get(key)) and math.isfinite(row[key])
    ]
