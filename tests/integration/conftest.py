"""Real servers for the deployment tests: the stack `make serve` starts, on free loopback ports.

`served_stack` starts it once per module through `ppoflow.deployments.serve.start` (the code behind
`make serve`): a Prefect server with its UI (the `ui` tests browse it), the MLflow server with basic
auth (SQLite), the `ppoflow` work pool, the deployments of deployments/prefect.yaml, and one process
worker whose MLflow credentials come from its environment. Its teardown is `make serve-stop` and checks that every
process it started is gone. Nothing here is autouse.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported in the fixture: the other tests here need no `deployments` package
    from ppoflow.deployments.serve import Stack

ADMIN_PASSWORD = "deploy-test-admin-" + secrets.token_hex(8)

# A worker polls every 10 s by default; the tests wait for three pick-ups.
WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "1"}


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@pytest.fixture(scope="module")
def served_stack(tmp_path_factory) -> Iterator[Stack]:
    from ppoflow.deployments import serve

    home = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_AUTH_ADMIN_USERNAME"):
            patch.delenv(name, raising=False)
        patch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
        patch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        # The test's own MLflow client logs in like the worker does.
        patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        stack = serve.start(home, prefect_port=0, mlflow_port=0, mlflow_auth=True, ui=True, worker_env=WORKER_ENV)
        try:
            yield stack
        finally:
            pids = [proc.pid for proc in serve.read_stack(home).processes.values()]
            mlflow_pid = int((home / "mlflow" / "mlflow-server.pid").read_text())
            stopped = serve.stop(home)
            assert {"worker", "prefect-server", "mlflow-server"} <= set(stopped)
            assert all(_gone(pid) for pid in [*pids, mlflow_pid])
