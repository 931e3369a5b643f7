"""Real servers for the deployment tests: the stack `make serve` starts, on free loopback ports.

`served_stack` starts it once per module through `ppoflow.deployments.serve.start` (the code behind
`make serve`): a Prefect server with its UI (the `ui` tests browse it), the MLflow server with basic
auth (SQLite), the `ppoflow` work pool, the deployments of deployments/prefect.yaml, one process
worker whose MLflow credentials come from its environment, and the alerts (`--alert-webhook`)
pointed at `alert_receiver`, a local HTTP server that keeps what is POSTed to it. Its teardown is
`make serve-stop` and checks that every process it started is gone. Nothing here is autouse.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class AlertReceiver:
    """A webhook on a free loopback port: the JSON bodies POSTed to it, in order."""

    def __init__(self):
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def alert_receiver() -> Iterator[AlertReceiver]:
    receiver = AlertReceiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def served_stack(tmp_path_factory, alert_receiver) -> Iterator[Stack]:
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
        stack = serve.start(
            home,
            prefect_port=0,
            mlflow_port=0,
            mlflow_auth=True,
            ui=True,
            worker_env=WORKER_ENV,
            alert_webhook=alert_receiver.url,
        )
        try:
            yield stack
        finally:
            pids = [proc.pid for proc in serve.read_stack(home).processes.values()]
            mlflow_pid = int((home / "mlflow" / "mlflow-server.pid").read_text())
            stopped = serve.stop(home)
            assert {"worker", "prefect-server", "mlflow-server"} <= set(stopped)
            assert all(_gone(pid) for pid in [*pids, mlflow_pid])
