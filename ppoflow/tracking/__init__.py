"""The only door from ppoflow to MLflow: one MLflow run per training job, with its lineage.

    store.py     where tracking goes (`MLFLOW_TRACKING_URI` or the embedded SQLite store),
                 whether it answers, MLflow's process-wide URI under a lock
    run.py       `open_run` and `TrackingRun`: the run of a config hash, its params, tags,
                 datasets, Prefect flow runs and system metrics; `run_name`; `tag_failure`
    metrics.py   `MetricsSink`: per-update metrics through a spool, never blocking training
    release.py   `check_release_names`, `log_release`: eval artifacts, logged model, registry, alias;
                 `describe_release`: the run's and the version's markdown descriptions

Everything here uses an explicit `MlflowClient(tracking_uri=...)` and run id (MLflow's active run is
thread-local, and Prefect runs tasks in other threads). Secrets go through `ppoflow.redaction`; the
git commit and library versions come from `ppoflow.provenance`. Importing this package imports
MLflow: the engine (`ppoflow train`) never does.
"""

from ppoflow.tracking.metrics import MetricsSink
from ppoflow.tracking.release import check_release_names, describe_release, log_release
from ppoflow.tracking.run import CONFIG_HASH_TAG, FAILURE_TAG, TrackingRun, flatten, open_run, run_name, tag_failure
from ppoflow.tracking.store import (
    TRACKING_URI_ENV,
    check_reachable,
    default_tracking_uri,
    first_line,
    mlflow_ui_run_url,
    resolve_tracking_uri,
)
from ppoflow.workspace import SPOOL_FILE

__all__ = [
    "CONFIG_HASH_TAG",
    "FAILURE_TAG",
    "SPOOL_FILE",
    "TRACKING_URI_ENV",
    "MetricsSink",
    "TrackingRun",
    "check_reachable",
    "check_release_names",
    "default_tracking_uri",
    "describe_release",
    "first_line",
    "mlflow_ui_run_url",
    "flatten",
    "log_release",
    "open_run",
    "resolve_tracking_uri",
    "run_name",
    "tag_failure",
]
