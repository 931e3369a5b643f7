"""Where tracking goes, whether it answers, and the rules for talking to it.

`MLFLOW_TRACKING_URI` when set (a server `http://host:port`, or `sqlite:////abs/mlflow.db`).
Otherwise an embedded store below the current working directory ABS:
`sqlite:////ABS/.ppoflow/mlflow/mlflow.db`, with artifacts in `/ABS/.ppoflow/mlflow/artifacts`
(`default_tracking_uri`). Any SQLite store keeps its experiments' artifacts in `artifacts/` beside
the database file (`artifact_location`); a server decides for itself. `check_reachable` fails in a
few seconds with a one-line `TrackingError` when the server does not answer, so a flow stops
before any expensive work.

MLflow's active run is thread-local and Prefect runs tasks in other threads, so the tracking
package uses an explicit `MlflowClient(tracking_uri=...)` and run id. Two MLflow 3.17 code paths
read the process-wide tracking URI whatever client is used (logging a transformers model and
registering a `models:/<id>` source in a SQL store); they run under `global_tracking_uri`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow

from ppoflow.errors import TrackingError
from ppoflow.redaction import redact

_LOGGER = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default (and `make demo` tells it to)
_GLOBAL_URI_LOCK = threading.Lock()


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
def global_tracking_uri(uri: str) -> Iterator[None]:
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


def in_batches(items: list, size: int) -> Iterator[list]:
    """`items` in lists of at most `size`: one MLflow request takes at most its batch limits."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def mlflow_ui_run_url(experiment_id: str, run_id: str, base: str = MLFLOW_UI) -> str:
    """The run's own page in the MLflow 3 UI (its machine-learning view: the UI otherwise opens an
    experiment on the GenAI overview)."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def first_line(exc: BaseException) -> str:
    """An MLflow error as one line (its messages can run to a stack of JSON)."""
    text = getattr(exc, "message", None) or str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]
