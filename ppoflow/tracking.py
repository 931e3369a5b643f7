"""The only door from ppoflow to MLflow: one MLflow run per training job, with its lineage.

Where tracking goes
    `MLFLOW_TRACKING_URI` when set (a server `http://host:port`, or `sqlite:////abs/mlflow.db`).
    Otherwise an embedded store below the current working directory ABS:
    `sqlite:////ABS/.ppoflow/mlflow/mlflow.db`, with artifacts in `/ABS/.ppoflow/mlflow/artifacts`
    (`default_tracking_uri`). Any SQLite store keeps its experiments' artifacts in `artifacts/`
    beside the database file (`artifact_location`); a server decides for itself.
    `check_reachable` fails in a few seconds with a one-line `TrackingError` when the server does
    not answer, so a flow stops before any expensive work.

One run per training job
    `open_run` looks up the newest run of the experiment tagged `ppoflow.config_hash` with the
    plan's hash, whatever its status, and creates one only when there is none. The hash covers
    everything that changes results, the output directory included, so a retried or resumed job
    continues its run (FAILED or RUNNING) and a finished job re-run with the same config (a cache
    hit: nothing new is trained) reuses its FINISHED run and only adds the new flow run's tags.
    A fresh run needs a new `output_dir` (or deleting the old run). Re-logging is idempotent:
    params already present are skipped, datasets already logged (same digest) are skipped, metric
    points already in the run (same key and step) are never sent twice.

Threads
    MLflow's active run is thread-local and Prefect runs tasks in other threads, so everything here
    uses an explicit `MlflowClient(tracking_uri=...)` and run id. Two MLflow 3.17 code paths read the
    process-wide tracking URI whatever client is used (logging a transformers model and registering
    a `models:/<id>` source in a SQL store); they run under a lock with the URI set and restored.

Metrics
    `TrackingRun.metrics_sink()` is the trainer's per-update callback. It appends each update to
    `OUTPUT/mlflow_spool.jsonl` and hands it to a background sender, so training never waits for
    or stops because of tracking: while MLflow is unreachable the updates wait in memory and in the
    spool (re-read when the run resumes after a crash) and are re-delivered, without duplicates,
    once it answers again or at `flush()`.

System metrics
    MLflow's own `SystemMetricsMonitor` (CPU, memory, disk, network, GPU when present; psutil)
    takes an explicit run id and tracking URI and runs in its own thread, so `start_system_metrics`
    uses it directly instead of the fluent `start_run(log_system_metrics=True)`. It samples every
    `sampling_interval` seconds into `system/*` metrics and stops by itself when the run is no longer
    RUNNING or the store cannot be read.

Secrets
    `redact` replaces values whose key names a secret (token, password, secret, api key,
    credentials) and the password of any `scheme://user:password@host` URI; every param, tag and
    config artifact goes through it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import math
import numbers
import os
import platform
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import yaml
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from ppoflow.config import TrackingConfig
from ppoflow.errors import TrackingError
from ppoflow.manifests import DatasetManifest, ModelManifest, ModelSource, Release, RunPlan

if TYPE_CHECKING:
    import pandas

_LOGGER = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
CONFIG_HASH_TAG = "ppoflow.config_hash"
POLICY_SHA_TAG = "ppoflow.policy_sha256"
SPOOL_FILE = "mlflow_spool.jsonl"
FLOW_RUN_IDS_TAG = "prefect.flow_run_ids"
LIBRARIES = ("torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "mlflow", "prefect")
PLOTS = {
    "reward": ("objective/scores", "objective/rlhf_reward"),
    "kl": ("objective/kl",),
    "losses": ("loss/policy_avg", "loss/value_avg"),
}
REDACTED = "***"

_SECRET_KEY = re.compile(
    r"(^|[_\-.])(token|auth|password|passwd|secret|credentials?|(api|access|secret|private)[_\-]?key|apikey)$",
    re.IGNORECASE,
)
_SPECIAL_TOKEN_KEY = re.compile(r"(^|[_\-.])(stop|eos|bos|pad|unk|sep|cls|mask)[_\-]token$", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]+:)(?P<password>[^\s/]+)(?=@[^@\s/]+)")
_GLOBAL_URI_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Tracking URI


def default_tracking_uri(base: Path) -> str:
    """The embedded store of a working directory: `sqlite:////ABS/.ppoflow/mlflow/mlflow.db`."""
    return f"sqlite:///{(Path(base) / '.ppoflow' / 'mlflow' / 'mlflow.db').resolve()}"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """An explicit URI, else `MLFLOW_TRACKING_URI`, else the embedded store of the current directory."""
    return tracking_uri or os.environ.get(TRACKING_URI_ENV) or default_tracking_uri(Path.cwd())


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for in-memory databases)."""
    raw = urllib.parse.unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return None if uri in ("sqlite://", "sqlite:///") or raw in ("", ":memory:") else Path(raw).resolve()


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: `artifacts/` beside a SQLite file; servers decide."""
    if tracking_uri.startswith("sqlite:"):
        database = _sqlite_path(tracking_uri)
        return (database.parent / "artifacts").as_uri() if database else None
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise a one-line `TrackingError` when the tracking store cannot be used; a few seconds at most."""
    shown = redact(uri)
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme == "file" or (scheme == "" and not uri.startswith("sqlite")):
        raise TrackingError(
            f"{TRACKING_URI_ENV}={shown}: MLflow 3.17 refuses file stores — "
            f"use sqlite:////abs/path/mlflow.db, a server http://host:port, or unset {TRACKING_URI_ENV} "
            "for the embedded store in .ppoflow/mlflow"
        )
    if scheme == "sqlite":
        _check_sqlite(uri, shown)
    elif scheme in ("http", "https"):
        _check_server(uri, shown, timeout)
    else:
        _LOGGER.debug("no reachability check for %s stores", scheme)


def _check_sqlite(uri: str, shown: str) -> None:
    database = _sqlite_path(uri)
    if database is None:
        return
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create {database.parent} ({exc.strerror})"
    else:
        writable = os.access(database.parent, os.W_OK) and (not database.exists() or os.access(database, os.W_OK))
        if writable:
            return
        problem = f"{database} is not writable"
    raise TrackingError(
        f"{TRACKING_URI_ENV}={shown}: {problem} — point {TRACKING_URI_ENV} at a writable sqlite:////abs/path/mlflow.db "
        "or unset it for the embedded store in .ppoflow/mlflow"
    )


def _check_server(uri: str, shown: str, timeout: float) -> None:
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    deadline = time.monotonic() + timeout
    problem = "no answer"
    for attempt in range(2):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with urllib.request.urlopen(health, timeout=min(remaining, 3.0)) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status} at /health"
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return  # it answers; credentials are MLflow's business
            problem = f"HTTP {exc.code} at /health"
        except (urllib.error.URLError, OSError) as exc:
            problem = str(getattr(exc, "reason", exc))
        if attempt == 0 and deadline - time.monotonic() > 1.0:
            time.sleep(0.5)
    raise TrackingError(
        f"MLflow tracking server {TRACKING_URI_ENV}={shown} does not answer ({problem}) — "
        f"start it (mlflow_server/) or fix {TRACKING_URI_ENV}, or unset it for the embedded SQLite store"
    )


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Set MLflow's process-wide tracking URI for the code paths that ignore the client's, then restore
    it exactly (mlflow's own `_use_tracking_uri` unsets a user's MLFLOW_TRACKING_URI on the way out)."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBAL_URI_LOCK:
        saved_uri = tracking_utils._tracking_uri
        saved_env = os.environ.get(TRACKING_URI_ENV)
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_uri)
            if saved_env is None:
                os.environ.pop(TRACKING_URI_ENV, None)
            else:
                os.environ[TRACKING_URI_ENV] = saved_env


# ---------------------------------------------------------------------------------------------
# Redaction and flattening


def is_secret_key(key: str) -> bool:
    """`hub_token`, `password`, `client_secret`, `api_key`... but not `stop_token` or `tokenizer`."""
    return bool(_SECRET_KEY.search(key)) and not _SPECIAL_TOKEN_KEY.search(key)


def redact(value: Any, key: str | None = None) -> Any:
    """Hide secrets: the whole value when its key names one, and passwords inside URIs; recurses."""
    if key is not None and is_secret_key(str(key)) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return _URI_PASSWORD.sub(lambda match: match.group("head") + REDACTED, value)
    if isinstance(value, Mapping):
        return {name: redact(item, str(name)) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item, key) for item in value]
    return value


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


def _tag_value(value: Any) -> str:
    return str(value)[:MAX_TAG_VAL_LENGTH]


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a run (absent ones are skipped)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_state(directory: Path | None = None) -> dict[str, str]:
    """Commit and dirtiness of the repository holding ppoflow, when it is a git checkout."""
    directory = directory or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory, capture_output=True, text=True, timeout=5, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "ppoflow.git.dirty": str(bool(status.strip())).lower()}


# ---------------------------------------------------------------------------------------------
# Opening the run


def run_name(plan: RunPlan) -> str:
    """`{policy model name}-{config_hash[:8]}`, e.g. `policy-3f2a9c01`."""
    policy = Path(plan.config.models.policy.rstrip("/")).name or "policy"
    return f"{policy}-{plan.config_hash[:8]}"


def _experiment_id(client: mlflow.MlflowClient, name: str, location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise TrackingError(
                    f"config field `tracking.experiment`: MLflow refused {name!r} ({_first_line(exc)}) — choose another name"
                ) from None
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"config field `tracking.experiment`: MLflow experiment {name!r} is deleted — restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or choose another name"
        )
    return experiment.experiment_id


def check_release_names(tracking: TrackingConfig) -> None:
    """Refuse a registered model name or alias that MLflow would refuse, before anything is trained
    or written (MLflow itself would only say so at registration, after the whole run)."""
    if not tracking.log_model:
        return
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved, _validate_model_name

    checks = (
        ("tracking.registered_model_name", tracking.registered_model_name, (_validate_model_name,)),
        ("tracking.alias", tracking.alias, (_validate_model_alias_name, _validate_model_alias_name_reserved)),
    )
    for field, value, validators in checks:
        for validate in validators:
            try:
                validate(value)
            except MlflowException as exc:
                raise TrackingError(f"config field `{field}`: MLflow refuses {value!r} ({_first_line(exc)}) — choose another name") from None


def open_run(plan: RunPlan, *, tracking_uri: str | None = None) -> TrackingRun:
    """The MLflow run of this training job: the newest run tagged with the plan's config hash, else a new one."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    check_release_names(plan.config.tracking)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, plan.config.tracking.experiment, artifact_location(uri))
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{plan.config_hash}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        run = found[0]
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        _LOGGER.info("continuing MLflow run %s (%s, was %s)", run.info.run_id, run.info.run_name, run.info.status)
    else:
        run = client.create_run(
            experiment_id,
            run_name=run_name(plan),
            tags={CONFIG_HASH_TAG: plan.config_hash, "mlflow.source.name": "ppoflow", "mlflow.source.type": "JOB"},
        )
        _LOGGER.info("created MLflow run %s (%s)", run.info.run_id, run.info.run_name)
    return TrackingRun(client, run.info.run_id, experiment_id, plan.output_dir)


# ---------------------------------------------------------------------------------------------
# The run


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

    # -- params and tags ------------------------------------------------------------------------

    def _set_tags(self, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(key, _tag_value(redact(value, key))) for key, value in tags.items() if value is not None]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
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
            _LOGGER.warning("param %s changed on resume: %r -> %r (kept the first, tagged the new)", key, present[key], value)
        if changed:
            self._set_tags({f"ppoflow.changed.{key}": value for key, value in changed.items()})
        new = [Param(key, value) for key, value in params.items() if key not in present]
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_plan(self, plan: RunPlan) -> None:
        """Params: the flattened config, the batch arithmetic and library versions; tags: hash and git;
        artifact: the resolved config as `config/config.yaml`."""
        tree = redact(plan.config.model_dump(mode="json"))
        attempt_sections = {name: tree.pop(name) for name in ("tracking", "flow")}
        identity = flatten(tree) | flatten({"batch": plan.batch.model_dump(mode="json")})
        attempt = flatten(attempt_sections) | flatten({"version": library_versions()})
        self._log_params(identity, identity=True)
        self._log_params(attempt, identity=False)
        self._set_tags({
            CONFIG_HASH_TAG: plan.config_hash,
            "ppoflow.output_dir": str(Path(plan.output_dir).resolve()),
            "ppoflow.num_updates": plan.batch.num_updates,
            **git_state(),
        })
        resolved = redact(plan.config.model_dump(mode="json"))
        self.client.log_text(self.run_id, yaml.safe_dump(resolved, sort_keys=False), "config/config.yaml")

    def log_models(self, models: ModelManifest) -> None:
        """Lineage tags `ppoflow.<role>.{source,revision,sha256,class,num_parameters}` and the tokenizer's."""
        tags: dict[str, Any] = {}
        roles: dict[str, ModelSource | None] = {
            "policy": models.policy, "ref": models.ref, "reward": models.reward, "value": models.value,
        }
        for role, model in roles.items():
            if model is None:
                tags[f"ppoflow.{role}.source"] = "policy with the LoRA adapter disabled"
                continue
            tags |= {
                f"ppoflow.{role}.source": model.source,
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
        }
        self._set_tags(tags)

    def log_datasets(self, data: DatasetManifest, train: pandas.DataFrame, eval: pandas.DataFrame) -> None:
        """Both splits as MLflow dataset inputs (contexts "training"/"evaluation", digests from the
        manifest), skipping ones already on the run; tags with the manifest's counts."""
        present = {
            (entry.dataset.digest, tag.value)
            for entry in self.client.get_run(self.run_id).inputs.dataset_inputs
            for tag in entry.tags
            if tag.key == "mlflow.data.context"
        }
        source = redact(data.source)
        stem = Path(source.rstrip("/")).stem or "prompts"
        inputs = []
        for split, context, frame, digest in (
            ("train", "training", train, data.train_digest),
            ("eval", "evaluation", eval, data.eval_digest),
        ):
            digest = digest[:MAX_DATASET_DIGEST_SIZE]
            if (digest, context) in present:
                continue
            dataset = mlflow.data.from_pandas(frame, source=_dataset_source(source), name=f"{stem}-{split}", digest=digest)
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)
        self._set_tags({
            f"ppoflow.data.{field}": getattr(data, field)
            for field in (
                "source", "fingerprint", "rows_read", "rows_kept", "dropped_too_long", "dropped_empty",
                "eos_stripped", "eos_dropped", "train_rows", "eval_rows", "train_digest", "eval_digest",
            )
        })

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
            self._set_tags({
                FLOW_RUN_IDS_TAG: ",".join(ids),
                f"prefect.flow_run.{flow_run_id}": about,
                "prefect.last_flow_run_id": flow_run_id,
            })

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
                    self.run_id, sampling_interval=sampling_interval, resume_logging=True, tracking_uri=self.tracking_uri
                )
            except Exception as exc:  # psutil missing or store unreadable: training goes on without
                _LOGGER.warning("system metrics are off: %s", _first_line(exc))
                return
            monitor.start()
            self._system_monitor = monitor

    def stop_system_metrics(self) -> None:
        with self._lock:
            monitor, self._system_monitor = self._system_monitor, None
        if monitor is not None:
            monitor.finish()

    def _log_metrics_once(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metric points whose (key, step) is not yet in the run."""
        fresh = []
        for key, value in metrics.items():
            if any(point.step == step for point in self.client.get_metric_history(self.run_id, key)):
                continue
            fresh.append(Metric(key, float(value), int(time.time() * 1000), step))
        for chunk in _chunks(fresh, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    # -- release --------------------------------------------------------------------------------

    def log_release(
        self,
        release: Release,
        *,
        samples: pandas.DataFrame,
        metrics_history: list[dict],
        eval_report: dict,
        policy_dir: Path,
        registered_model_name: str,
        alias: str,
        log_model: bool,
    ) -> Release:
        """Artifacts (samples table, plots, eval report), `eval/*` metrics, and (with `log_model`) the
        policy as an MLflow logged model registered under `registered_model_name` with `alias`.
        A retried release finds the version this run already registered for the same weights."""
        self._deliver_spooled_metrics()
        version = None
        if log_model:
            _check_model_dir(Path(policy_dir))
            version = self._registered_version(registered_model_name, release.policy_sha256)
            if version is None:
                self._create_registered_model(registered_model_name)  # a refused name fails before any work
        self.client.log_table(self.run_id, samples, "eval/samples.json")
        self.client.log_text(self.run_id, samples.to_csv(index=False), "eval/samples.csv")
        self.client.log_dict(self.run_id, eval_report, "eval/eval.json")
        for name, keys in PLOTS.items():
            figure = _plot(metrics_history, keys, name)
            if figure is not None:
                self.client.log_figure(self.run_id, figure, f"plots/{name}.png")
        last_update = max((int(row.get("update", 0)) for row in metrics_history), default=0)
        numeric = {key: float(value) for key, value in eval_report.items() if _is_number(value)}
        self._log_metrics_once({f"eval/{key}": value for key, value in numeric.items()}, last_update)
        filled = release.model_copy(update={"mlflow_run_id": self.run_id})
        if not log_model:
            return filled
        if version is None:
            model_id = self._log_policy(Path(policy_dir), release, last_update)
            version = self._register(registered_model_name, model_id, release, numeric)
        else:
            _LOGGER.info("policy %s is already version %s of %s", release.policy_sha256[:12], version.version, registered_model_name)
        try:
            self.client.set_registered_model_alias(registered_model_name, alias, version.version)
        except MlflowException as exc:
            raise TrackingError(
                f"config field `tracking.alias`: MLflow refused alias {alias!r} ({_first_line(exc)}) — "
                "use letters, digits, '_' or '-', not 'latest' or 'v<number>'"
            ) from None
        model_uri = version.source if version.source.startswith("models:/") else f"models:/{registered_model_name}/{version.version}"
        self._set_tags({"ppoflow.model_uri": model_uri, "ppoflow.registered_model": f"{registered_model_name}/{version.version}"})
        return filled.model_copy(update={
            "model_uri": model_uri, "registered_model": registered_model_name, "registered_version": str(version.version),
        })

    def _deliver_spooled_metrics(self, timeout: float = 60.0) -> None:
        """Training metrics still in the spool (MLflow was away when training ended and the sink's
        flush gave up) go out before the release: once training is finished (cached), no sink of
        the training stage is ever created again to re-read the spool."""
        if (self.output_dir / SPOOL_FILE).is_file():
            MetricsSink(self.client, self.run_id, self.output_dir / SPOOL_FILE).close(timeout)

    def _registered_version(self, name: str, policy_sha256: str) -> Any:
        """A version this run already registered for the same policy weights (a retried release)."""
        try:
            versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        except MlflowException:
            return None
        matching = [version for version in versions if version.tags.get(POLICY_SHA_TAG) == policy_sha256]
        return max(matching, key=lambda version: int(version.version), default=None)

    def _create_registered_model(self, name: str) -> None:
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return
            raise TrackingError(
                f"config field `tracking.registered_model_name`: MLflow refused {name!r} ({_first_line(exc)}) — choose another name"
            ) from None

    def _log_policy(self, policy_dir: Path, release: Release, step: int) -> str:
        """The policy as an MLflow logged model of this run; returns its model id.

        MLflow 3.17 cannot log a transformers *directory* with transformers 5 (it reads
        `check_task(...)["impl"].__name__`, now a string), so the model and tokenizer are loaded and
        logged as components. The logged model is created here with the run's experiment (the flavor
        would otherwise put it in the default experiment), pip requirements are given (the flavor's
        default list asks for torchvision), and a local model card keeps it off the Hub. `step` links
        the run's metrics at that update (the final ones) to the logged model.
        """
        from huggingface_hub import ModelCard
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(policy_dir, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        logged = self.client.create_logged_model(
            self.experiment_id,
            name="policy",
            source_run_id=self.run_id,
            tags={POLICY_SHA_TAG: release.policy_sha256, CONFIG_HASH_TAG: self._config_hash()},
        )
        card = ModelCard(f"---\ntags: [ppoflow, rlhf, ppo]\n---\n# PPO policy\n\nTrained by ppoflow, MLflow run {self.run_id}.\n")
        with _global_tracking_uri(self.tracking_uri):
            mlflow.transformers.log_model(
                {"model": model, "tokenizer": tokenizer},
                name="policy",
                task="text-generation",
                run_id=self.run_id,
                model_id=logged.model_id,
                model_card=card,
                pip_requirements=_pip_requirements(),
                step=step,
            )
        return logged.model_id

    def _register(self, name: str, model_id: str, release: Release, eval_metrics: Mapping[str, float]) -> Any:
        tags = {f"eval.{key}": repr(value) for key, value in eval_metrics.items()}
        tags |= {CONFIG_HASH_TAG: self._config_hash(), POLICY_SHA_TAG: release.policy_sha256}
        # The SQL registry resolves a `models:/<id>` source through the process-wide tracking URI.
        with _global_tracking_uri(self.tracking_uri):
            version = self.client.create_model_version(
                name, source=f"models:/{model_id}", run_id=self.run_id, model_id=model_id, tags=tags
            )
        _LOGGER.info("registered %s version %s (run %s)", name, version.version, self.run_id)
        return version

    def _config_hash(self) -> str:
        return self.client.get_run(self.run_id).data.tags.get(CONFIG_HASH_TAG, "")

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


def _dataset_source(source: str) -> Any:
    """An MLflow dataset source for a local path, a URI, or a Hugging Face Hub dataset id."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

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


def _check_model_dir(policy_dir: Path) -> None:
    if not (policy_dir / "config.json").is_file():
        raise TrackingError(
            f"{policy_dir} is not a full Hugging Face model directory (no config.json; a LoRA adapter?) — "
            "log the merged model (peft.merge_on_save: true) or set tracking.log_model: false"
        )


def _pip_requirements() -> list[str]:
    versions = library_versions()
    return [f"{name}=={versions[name]}" for name in ("transformers", "torch", "tokenizers", "accelerate") if name in versions]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plot(history: list[dict], keys: tuple[str, ...], title: str) -> Any:
    """A line plot of `keys` over updates, or None when no key has data. Uses the Agg canvas through
    `matplotlib.figure.Figure` (no pyplot: no global figure state shared between threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    plotted = False
    for key in keys:
        points = [
            (row.get("update", index), float(row[key]))
            for index, row in enumerate(history)
            if _is_number(row.get(key)) and math.isfinite(row[key])
        ]
        if points:
            axes.plot(*zip(*points), marker=".", label=key)
            plotted = True
    if not plotted:
        return None
    axes.set_xlabel("update")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


# ---------------------------------------------------------------------------------------------
# Metrics sink


class MetricsSink:
    """Trainer callback: `sink(update_metrics)` logs one update's numeric values at `step=update`.

    Each update is appended to the spool file first, then sent by a background thread with
    `log_batch`, so the trainer never waits for MLflow. Points already in the run (same key and
    step, read once per key from the run's history, re-read after any failed send since a failed
    request may still have been applied) are skipped: a resumed job re-logging updates 3..6 after
    0..4 adds only 5 and 6. Failed sends stay queued (memory and spool) and are retried with
    backoff, on the next update and at `flush()`; the spool is emptied whenever everything is
    delivered and re-read when a sink is created for the same run (after a crash).
    """

    RETRY_MIN_SECONDS = 1.0
    RETRY_MAX_SECONDS = 30.0

    def __init__(self, client: mlflow.MlflowClient, run_id: str, spool_path: Path):
        self._client = client
        self._run_id = run_id
        self._spool_path = Path(spool_path)
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._pending: list[dict] = self._read_spool()
        self._logged: dict[str, set[int]] = {}
        self._failing = False
        self._spool_warned = False
        self._closing = False
        self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()
        if self._pending:
            _LOGGER.info("re-delivering %d spooled metric updates from %s", len(self._pending), self._spool_path)
            self._wake.set()

    def __call__(self, update_metrics: Mapping[str, Any]) -> None:
        try:
            record = {
                "run_id": self._run_id,
                "step": int(update_metrics["update"]),
                "timestamp": int(time.time() * 1000),
                "metrics": {key: float(value) for key, value in update_metrics.items() if key != "update" and _is_number(value)},
            }
            with self._lock:
                self._append_spool(record)
                self._pending.append(record)
            self._wake.set()
        except Exception as exc:  # tracking must never stop training
            _LOGGER.warning("metrics of update %s not tracked: %s", update_metrics.get("update"), _first_line(exc))

    @property
    def pending(self) -> int:
        """Updates not yet delivered."""
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait up to `timeout` seconds for delivery; False when updates stay in the spool."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.set()
                self._drained.wait(min(remaining, 2.0))
            left = len(self._pending)
        if left:
            _LOGGER.warning(
                "%d metric updates not delivered to MLflow; kept in %s for when the run resumes", left, self._spool_path
            )
        return left == 0

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then stop the sender thread."""
        delivered = self.flush(timeout)
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join(timeout=5.0)
        return delivered

    # -- sender thread ---------------------------------------------------------------------------

    def _send_loop(self) -> None:
        delay = self.RETRY_MIN_SECONDS
        while True:
            with self._lock:
                batch = list(self._pending)
                closing = self._closing
            if not batch:
                if closing:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            if self._send(batch):
                delay = self.RETRY_MIN_SECONDS
                with self._lock:
                    del self._pending[: len(batch)]
                    if not self._pending:
                        self._remove_spool()
                    self._drained.notify_all()
                continue
            if closing:
                return
            self._wake.wait(delay)
            self._wake.clear()
            delay = min(delay * 2, self.RETRY_MAX_SECONDS)

    def _send(self, batch: list[dict]) -> bool:
        try:
            for key in {key for record in batch for key in record["metrics"]} - self._logged.keys():
                self._logged[key] = {point.step for point in self._client.get_metric_history(self._run_id, key)}
            metrics = []
            for record in batch:
                step = record["step"]
                for key, value in record["metrics"].items():
                    if step not in self._logged[key]:
                        self._logged[key].add(step)
                        metrics.append(Metric(key, value, record["timestamp"], step))
            for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=chunk)
        except Exception as exc:
            self._logged.clear()  # unknown what reached the store: re-read the history before retrying
            if not self._failing:
                _LOGGER.warning(
                    "MLflow did not take metrics of updates %d..%d (%s); buffering them in memory and %s, retrying",
                    batch[0]["step"], batch[-1]["step"], _first_line(exc), self._spool_path,
                )
            self._failing = True
            return False
        if self._failing:
            _LOGGER.info("MLflow answers again: delivered %d buffered metric updates", len(batch))
            self._failing = False
        return True

    # -- spool -----------------------------------------------------------------------------------

    def _append_spool(self, record: dict) -> None:
        try:
            self._spool_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._spool_path, "a", encoding="utf-8") as spool:
                spool.write(json.dumps(record) + "\n")
        except OSError as exc:
            if not self._spool_warned:
                _LOGGER.warning("cannot write the metrics spool %s (%s); buffering in memory only", self._spool_path, exc.strerror)
                self._spool_warned = True

    def _remove_spool(self) -> None:
        try:
            self._spool_path.unlink(missing_ok=True)
        except OSError as exc:
            _LOGGER.warning("cannot remove the delivered metrics spool %s (%s)", self._spool_path, exc.strerror)

    def _read_spool(self) -> list[dict]:
        if not self._spool_path.is_file():
            return []
        records = []
        for number, line in enumerate(self._spool_path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                _LOGGER.warning("skipping unreadable line %d of %s (cut short by a crash?)", number, self._spool_path)
                continue
            if record.get("run_id") == self._run_id:
                records.append(record)
            else:
                _LOGGER.warning("dropping a spooled update of another MLflow run (%s)", record.get("run_id"))
        return records

