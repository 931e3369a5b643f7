"""One MLflow run per training job: opening it, and its params, tags, datasets and system metrics.

`open_run` looks up the newest run of the experiment tagged with the plan's config hash
(`ppoflow.config_hash`) and the training's fingerprint (`ppoflow.training_fingerprint`: the models'
and data's, `manifests.training_fingerprint`), whatever its status, and creates one only when there
is none. Together they cover everything that changes results, the output directory included, so a
retried or resumed job continues its run (FAILED or RUNNING), a finished job re-run (a cache hit:
nothing new is trained) reuses its FINISHED run and only adds the new flow run's tags, and the same
config on new partitions (or from a moved alias) is a run of its own. Re-logging is idempotent:
params already present are skipped, datasets already logged (same digest) are skipped, metric
points already in the run (same key and step) are never sent twice.

System metrics: MLflow's own `SystemMetricsMonitor` (CPU, memory, disk, network, GPU when present;
psutil) takes an explicit run id and tracking URI and runs in its own thread, so
`start_system_metrics` uses it directly instead of the fluent `start_run(log_system_metrics=True)`.
It samples every `sampling_interval` seconds into `system/*` metrics and stops by itself when the
run is no longer RUNNING or the store cannot be read.

A failed flow run's reason is the run's `ppoflow.failure` tag (and `ppoflow.failed_stage`), set by
`tag_failure` from the flow's failure hook; a later run that finishes the job removes them.

Every param, tag and config artifact goes through `ppoflow.redaction.redact`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import yaml
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from ppoflow.config import ATTEMPT_SECTIONS, REGISTRY_URI, RunConfig
from ppoflow.errors import TrackingError
from ppoflow.manifests import DatasetManifest, ModelManifest, RunPlan
from ppoflow.partitions import is_glob
from ppoflow.provenance import git_state, library_versions
from ppoflow.redaction import redact
from ppoflow.tracking.metrics import MetricsSink
from ppoflow.tracking.store import artifact_location, check_reachable, first_line, in_batches, resolve_tracking_uri
from ppoflow.workspace import SPOOL_FILE

if TYPE_CHECKING:
    import pandas

_LOGGER = logging.getLogger(__name__)

CONFIG_HASH_TAG = "ppoflow.config_hash"
OUTPUT_DIR_TAG = "ppoflow.output_dir"  # the workspace: two workspaces of one config are two runs
TRAINING_TAG = "ppoflow.training_fingerprint"
PARTITIONS_TAG = "ppoflow.data.partitions"
PARTITION_CONTEXT = "partition"
FLOW_RUN_IDS_TAG = "prefect.flow_run_ids"
LAST_FLOW_RUN_TAG = "prefect.last_flow_run_id"
FAILURE_TAG = "ppoflow.failure"
FAILED_STAGE_TAG = "ppoflow.failed_stage"


def run_name(config: RunConfig, config_hash: str) -> str:
    """`{policy model name}-{config_hash[:8]}`, e.g. `policy-3f2a9c01`: the MLflow run's name, and
    the Prefect flow run's (its stage runs add the stage: `load_models[policy-3f2a9c01]`)."""
    source = config.models.policy
    match = REGISTRY_URI.fullmatch(source)
    if match:  # models:/NAME@ALIAS -> NAME@ALIAS, models:/NAME/VERSION -> NAME-v3
        policy = f"{match['name']}@{match['alias']}" if match["alias"] else f"{match['name']}-v{match['version']}"
    else:
        policy = Path(source.rstrip("/")).name or "policy"
    return f"{policy}-{config_hash[:8]}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> dotted string params (`ppo.learning_rate`); lists are JSON, values truncated."""
    flat: dict[str, str] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, key + "."))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[key] = json.dumps(value, default=str)[:MAX_PARAM_VAL_LENGTH]
        else:
            flat[key] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return flat


def open_run(plan: RunPlan, training: str, *, tracking_uri: str | None = None) -> TrackingRun:
    """The MLflow run of this training job: the newest run tagged with the plan's config hash, the
    `training` fingerprint and its workspace, else a new one."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, plan.config.tracking.experiment, artifact_location(uri))
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{plan.config_hash}' AND tags.`{TRAINING_TAG}` = '{training}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    # compared here: no quoting
    found = [run for run in found if run.data.tags.get(OUTPUT_DIR_TAG) == str(plan.output_dir)]
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        _LOGGER.info("continuing MLflow run %s (%s, was %s)", run.info.run_id, run.info.run_name, run.info.status)
    else:
        run = client.create_run(
            experiment_id,
            run_name=run_name(plan.config, plan.config_hash),
            tags={
                CONFIG_HASH_TAG: plan.config_hash,
                TRAINING_TAG: training,
                OUTPUT_DIR_TAG: str(plan.output_dir),
                "mlflow.source.name": "ppoflow",
                "mlflow.source.type": "JOB",
            },
        )
        _LOGGER.info("created MLflow run %s (%s)", run.info.run_id, run.info.run_name)
    return TrackingRun(client, run.info.run_id, experiment_id, plan.output_dir)


def tag_failure(
    flow_run_id: str, experiment: str, reason: str, stage: str | None, *, tracking_uri: str | None = None
) -> TrackingRun | None:
    """Tag the MLflow run that flow run `flow_run_id` last worked on with why it failed (`reason`, one
    line, redacted) and where; that run, or None when that flow run opened no MLflow run."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{LAST_FLOW_RUN_TAG}` = '{flow_run_id}'",
            max_results=1,
        )
        if found is not None
        else []
    )
    if not runs:
        return None
    run = TrackingRun(client, runs[0].info.run_id, found.experiment_id, Path("."))
    run.set_tags({FAILURE_TAG: redact(reason), FAILED_STAGE_TAG: stage or "start-up checks"})
    return run


def _experiment_id(client: mlflow.MlflowClient, name: str, location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise TrackingError(
                    "config field `tracking.experiment`: MLflow refused "
                    f"{name!r} ({first_line(exc)}) — choose another name"
                ) from None
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"config field `tracking.experiment`: MLflow experiment {name!r} is deleted — restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or choose another name"
        )
    return experiment.experiment_id


class TrackingRun:
    """One MLflow run addressed by explicit id; safe to use from any thread."""

    def __init__(self, client: mlflow.MlflowClient, run_id: str, experiment_id: str, output_dir: Path):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.output_dir = Path(output_dir)
        self._sink: MetricsSink | None = None
        self._system_monitor: Any = None
        self._lock = threading.Lock()

    @classmethod
    def attach(cls, run_id: str, *, output_dir: Path, tracking_uri: str | None = None) -> TrackingRun:
        """An existing run, by id (e.g. from a manifest handed over by another task or process)."""
        client = mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
        return cls(client, run_id, client.get_run(run_id).info.experiment_id, output_dir)

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def config_hash(self) -> str:
        """The config hash the run is tagged with (the identity of its training job)."""
        return self.client.get_run(self.run_id).data.tags.get(CONFIG_HASH_TAG, "")

    # -- params and tags ------------------------------------------------------------------------

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags, redacted and cut to MLflow's length limit; None values are left out."""
        entries = [
            RunTag(key, str(redact(value, key))[:MAX_TAG_VAL_LENGTH])
            for key, value in tags.items()
            if value is not None
        ]
        for chunk in in_batches(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def _log_params(self, params: Mapping[str, str], *, identity: bool) -> None:
        """Log params not yet in the run. A different value for one already there is a config hash
        collision for `identity` params (raise) and a legitimate change for the others (warn, tag)."""
        present = self.client.get_run(self.run_id).data.params
        changed = {key: value for key, value in params.items() if key in present and present[key] != value}
        if changed and identity:
            key = sorted(changed)[0]
            raise TrackingError(
                f"MLflow run {self.run_id} has param {key}={present[key]!r} but this plan has {changed[key]!r} "
                "under the same config hash (a hash collision or an edited run) — delete that run or change output_dir"
            )
        for key, value in changed.items():
            _LOGGER.warning(
                "param %s changed on resume: %r -> %r (kept the first, tagged the new)", key, present[key], value
            )
        if changed:
            self.set_tags({f"ppoflow.changed.{key}": value for key, value in changed.items()})
        new = [Param(key, value) for key, value in params.items() if key not in present]
        for chunk in in_batches(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_plan(self, plan: RunPlan) -> None:
        """Params: the flattened config, the batch arithmetic and library versions; tags: hash and git;
        artifact: the resolved config as `config/config.yaml`."""
        tree = redact(plan.config.model_dump(mode="json"))
        attempt_sections = {name: tree.pop(name) for name in ATTEMPT_SECTIONS}
        identity = flatten(tree) | flatten({"batch": plan.batch.model_dump(mode="json")})
        attempt = flatten(attempt_sections) | flatten({"version": library_versions()})
        self._log_params(identity, identity=True)
        self._log_params(attempt, identity=False)
        git = git_state()
        self.set_tags(
            {
                CONFIG_HASH_TAG: plan.config_hash,
                "ppoflow.output_dir": str(Path(plan.output_dir).resolve()),
                "ppoflow.num_updates": plan.batch.num_updates,
                **(
                    {"mlflow.source.git.commit": git.commit, "ppoflow.git.dirty": str(git.dirty).lower()} if git else {}
                ),
            }
        )
        resolved = redact(plan.config.model_dump(mode="json"))
        self.client.log_text(self.run_id, yaml.safe_dump(resolved, sort_keys=False), "config/config.yaml")

    def log_models(self, models: ModelManifest) -> None:
        """Lineage tags `ppoflow.<role>.{source,revision,sha256,class,num_parameters}` (and `registry_version`,
        `models:/NAME/VERSION`, for a registry source) and the tokenizer's."""
        tags: dict[str, Any] = {}
        for role, model in models.roles().items():
            if model is None:
                tags[f"ppoflow.{role}.source"] = "policy with the LoRA adapter disabled"
                continue
            tags |= {
                f"ppoflow.{role}.source": model.source,
                f"ppoflow.{role}.registry_version": model.registry_uri,
                f"ppoflow.{role}.revision": model.revision or "none",
                f"ppoflow.{role}.sha256": model.sha256,
                f"ppoflow.{role}.class": model.model_class,
                f"ppoflow.{role}.num_parameters": model.num_parameters,
            }
        tags |= {
            "ppoflow.tokenizer.sha256": models.tokenizer_sha256,
            "ppoflow.tokenizer.pad_token_id": models.pad_token_id,
            "ppoflow.tokenizer.eos_token_id": models.eos_token_id,
            "ppoflow.tokenizer.stop_token_id": models.stop_token_id,
            "ppoflow.reward.tokenizer": "own (prompt + response re-encoded as text)"
            if models.reward_tokenizer_dir
            else "the policy's",
            "ppoflow.reward.tokenizer.sha256": models.reward_tokenizer_sha256,
            "ppoflow.reward.chat_template": ("its own" if models.reward_chat_template else "none")
            if models.reward_tokenizer_dir
            else None,
        }
        self.set_tags(tags)

    def log_datasets(self, data: DatasetManifest, load: Callable[[Path], pandas.DataFrame]) -> None:
        """Both splits as MLflow dataset inputs (contexts "training"/"evaluation", digests from the
        manifest) and each partition read (context "partition", named by its file stem, its sha256
        as digest), skipping ones already on the run; tags with the manifest's counts and
        `ppoflow.data.partitions`. `load(split_dir)` reads a split for its schema and profile, only
        for a split the run does not hold yet (a retry or re-run reads none)."""
        present = {
            (entry.dataset.name, entry.dataset.digest, tag.value)
            for entry in self.client.get_run(self.run_id).inputs.dataset_inputs
            for tag in entry.tags
            if tag.key == "mlflow.data.context"
        }
        source = redact(data.source)
        stem = Path(source.rstrip("/")).stem or "prompts"
        inputs = []
        for split, context, split_dir, digest in (
            ("train", "training", data.train_dir, data.train_digest),
            ("eval", "evaluation", data.eval_dir, data.eval_digest),
        ):
            digest = digest[:MAX_DATASET_DIGEST_SIZE]
            if (f"{stem}-{split}", digest, context) in present:
                continue
            dataset = mlflow.data.from_pandas(
                load(split_dir), source=_dataset_source(source), name=f"{stem}-{split}", digest=digest
            )
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        for partition in data.partitions:
            name, digest = partition.path.stem, partition.sha256[:MAX_DATASET_DIGEST_SIZE]
            if (name, digest, PARTITION_CONTEXT) in present:
                continue
            dataset = MetaDataset(_dataset_source(redact(str(partition.path))), name=name, digest=digest)
            inputs.append(
                DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", PARTITION_CONTEXT)])
            )
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)
        self.set_tags(
            {
                f"ppoflow.data.{field}": getattr(data, field)
                for field in (
                    "source",
                    "fingerprint",
                    "rows_read",
                    "rows_kept",
                    "dropped_too_long",
                    "dropped_empty",
                    "eos_stripped",
                    "eos_dropped",
                    "train_rows",
                    "eval_rows",
                    "train_digest",
                    "eval_digest",
                )
            }
            | {PARTITIONS_TAG: _partitions_tag(data) if data.partitions else None}
        )

    def tag_flow_run(
        self, flow_run_id: str, flow_run_name: str | None, deployment: str | None, ui_url: str | None
    ) -> None:
        """Name every Prefect flow run that worked on this MLflow run (retries and resumes accumulate)."""
        with self._lock:
            known = self.client.get_run(self.run_id).data.tags.get(FLOW_RUN_IDS_TAG, "")
            ids = [item for item in known.split(",") if item]
            if flow_run_id not in ids:
                ids.append(flow_run_id)
            while len(",".join(ids)) > MAX_TAG_VAL_LENGTH and len(ids) > 1:
                ids.pop(0)
            about = json.dumps(redact({"name": flow_run_name, "deployment": deployment, "url": ui_url}))
            self.set_tags(
                {
                    FLOW_RUN_IDS_TAG: ",".join(ids),
                    f"prefect.flow_run.{flow_run_id}": about,
                    LAST_FLOW_RUN_TAG: flow_run_id,
                }
            )

    # -- metrics --------------------------------------------------------------------------------

    def metrics_sink(self) -> MetricsSink:
        """The trainer callback for per-update metrics (one per run object; see `MetricsSink`)."""
        with self._lock:
            if self._sink is None:
                self._sink = MetricsSink(self.client, self.run_id, self.output_dir / SPOOL_FILE)
            return self._sink

    def flush(self, timeout: float = 30.0) -> bool:
        """Deliver buffered metrics; False when some stay in the spool for a later resume."""
        return self._sink.flush(timeout) if self._sink is not None else True

    def start_system_metrics(self, sampling_interval: float = 10.0) -> None:
        """Sample CPU/memory/disk/network (and GPU) into `system/*` metrics from a background thread."""
        with self._lock:
            if self._system_monitor is not None:
                return
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                monitor = SystemMetricsMonitor(
                    self.run_id,
                    sampling_interval=sampling_interval,
                    resume_logging=True,
                    tracking_uri=self.tracking_uri,
                )
            except Exception as exc:  # psutil missing or store unreadable: training goes on without
                _LOGGER.warning("system metrics are off: %s", first_line(exc))
                return
            monitor.start()
            self._system_monitor = monitor

    def stop_system_metrics(self) -> None:
        with self._lock:
            monitor, self._system_monitor = self._system_monitor, None
        if monitor is not None:
            monitor.finish()

    # -- end ------------------------------------------------------------------------------------

    def finish(self, status: str = "FINISHED", *, flush_timeout: float = 30.0) -> None:
        """Stop system metrics, deliver buffered metrics, and end the run with `status`."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, not {status!r}")
        self.stop_system_metrics()
        if self._sink is not None:
            self._sink.close(flush_timeout)
        # With a server, MLflow writes the run's URL to stdout, which belongs to the CLI: log it instead.
        # (redirect_stdout is process-wide for this short call; anything caught is logged, not lost.)
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            self.client.set_terminated(self.run_id, status=status)
        for line in captured.getvalue().splitlines():
            _LOGGER.info("%s", redact(line))  # the run's URL carries the tracking URI's password, if any
        if status == "FINISHED":  # the job got through: an earlier flow run's failure is history
            tags = self.client.get_run(self.run_id).data.tags
            for key in (FAILURE_TAG, FAILED_STAGE_TAG):
                if key in tags:
                    self.client.delete_tag(self.run_id, key)


def _partitions_tag(data: DatasetManifest) -> str:
    """JSON `[[file stem, sha256], ...]` of the partitions read, oldest first; past MLflow's tag
    length the oldest are left out (the dataset inputs still list every one)."""
    entries = [[partition.path.stem, partition.sha256] for partition in data.partitions]
    while len(text := json.dumps(entries, separators=(",", ":"))) > MAX_TAG_VAL_LENGTH:
        entries.pop(0)
    return text


def _dataset_source(source: str) -> Any:
    """An MLflow dataset source for a local path (a glob: the directory it looks in), a URI, or a
    Hugging Face Hub dataset id."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if is_glob(source) and Path(source).expanduser().parent.is_dir():
        source = str(Path(source).expanduser().parent)
    if Path(source).expanduser().exists():
        # MLflow 3.17 registers its local source class twice and warns on every resolve: pick one.
        local = [candidate for candidate in get_registered_sources() if candidate._get_source_type() == "local"][:1]
        return resolve_dataset_source(str(Path(source).expanduser().resolve()), candidate_sources=local)
    if "://" in source:
        try:
            return resolve_dataset_source(source)
        except MlflowException:
            pass
    return HuggingFaceDatasetSource(path=source)
