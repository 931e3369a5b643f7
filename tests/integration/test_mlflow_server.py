"""mlflow_server: a real `mlflow server` (SQLite, basic auth, PostgreSQL) started and stopped.

Each test starts at most one server (~8-15 s on 2 cores). The auth and PostgreSQL tests need the
`server` extra (`pip install -e '.[server]'`: mlflow[auth], psycopg[binary]); the PostgreSQL test
also needs Debian's server binaries (`apt-get install -y postgresql`) and is skipped without them.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ppoflow.mlflow_server import postgres as pg
from ppoflow.mlflow_server.server import (
    ServerError,
    main,
    read_info,
    server_status,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "test-admin-pw-0123456789"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_BACKEND_STORE_URI",
    ):
        monkeypatch.delenv(name, raising=False)


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{what} needs {module}: pip install -e '.[server]'")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _live_procs_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd and not _gone(int(entry.name)):
                found.append(int(entry.name))
    return found


def _log_run(url: str, tmp_path: Path, experiment: str = "ppoflow-test") -> tuple[str, str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    exp_id = client.create_experiment(experiment)
    run = client.create_run(exp_id)
    run_id = run.info.run_id
    client.log_metric(run_id, "objective/rlhf_reward", 0.75, step=3)
    artifact = tmp_path / "eval.json"
    artifact.write_text(json.dumps({"win_rate": 0.5}))
    client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id)
    return exp_id, run_id


def approvals_out_of_order(url: str, run_id: str, tmp_path: Path) -> None:
    """Two versions held for approval, approved newest first, on the server's registry: @champion ends
    on the newer one, each decision recorded (the SQL and REST paths of `ppoflow.tracking.approval`)."""
    import mlflow

    from ppoflow.config import PromotionConfig
    from ppoflow.tracking import TrackingRun
    from ppoflow.tracking.approval import Answer, settle
    from ppoflow.tracking.promotion import gate
    from ppoflow.tracking.release import alias_holder

    client = mlflow.MlflowClient(tracking_uri=url)
    run = TrackingRun(client, run_id, client.get_run(run_id).info.experiment_id, tmp_path)
    client.create_registered_model("approved-policy")
    source = f"{client.get_run(run_id).info.artifact_uri}/eval.json"
    held = {}
    for version in ("1", "2"):
        client.create_model_version("approved-policy", source=source, run_id=run_id)
        held[version] = gate(
            run,
            PromotionConfig(approval="required"),
            name="approved-policy",
            version=version,
            eval_metrics={"win_rate": 0.7, "reward_policy": 1.0, "reward_ref": 0.5, "kl": 0.1},
            evaluate=lambda baseline: {},  # no holder while both wait: judged against the reference
            fetch_root=tmp_path,
        )
        assert held[version]["awaiting_approval"] is True
    assert settle(run, "approved-policy", "2", held["2"], Answer("approve", "alice"))["promoted"] is True
    assert settle(run, "approved-policy", "1", held["1"], Answer("approve", "bob"))["promoted"] is False
    assert alias_holder(run, "approved-policy", "champion") == "2"
    tags = client.get_model_version("approved-policy", "1").tags
    assert (tags["ppoflow.approval"], tags["ppoflow.approval.approver"]) == ("approved", "bob")


def test_sqlite_server_roundtrip_and_stop(tmp_path, capsys):
    import mlflow

    home = tmp_path / "srv"
    info = start_server(home, port=0, backend="sqlite")
    try:
        assert info.url.startswith("http://127.0.0.1:") and info.port > 0
        assert info.backend_uri == f"sqlite:///{home.resolve() / 'mlflow.db'}"
        assert json.loads((home / "server.json").read_text())["pid"] == info.pid
        assert int((home / "mlflow-server.pid").read_text()) == info.pid
        assert server_status(home)[1:] == (True, True)

        _, run_id = _log_run(info.url, tmp_path)
        client = mlflow.MlflowClient(tracking_uri=info.url)
        run = client.get_run(run_id)
        assert run.data.metrics["objective/rlhf_reward"] == 0.75
        # Artifacts go through the server (proxied) into its artifacts destination.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert [f.path for f in client.list_artifacts(run_id)] == ["eval.json"]
        stored = list((home / "artifacts").rglob("eval.json"))
        assert len(stored) == 1 and run_id in str(stored[0])

        # A second start from the same home refuses instead of starting a twin.
        with pytest.raises(ServerError, match="already running"):
            start_server(home, port=0)
    finally:
        stopped = stop_server(home)
    assert stopped is True
    assert _gone(info.pid)
    assert not (home / "mlflow-server.pid").exists()
    assert read_info(home).state == "stopped"
    # Idempotent, in the library and the CLI.
    assert stop_server(home) is False
    assert main(["stop", "--home", str(home)]) == 0
    assert "not running" in capsys.readouterr().out
    assert main(["status", "--home", str(home)]) == 3
    assert "not running" in capsys.readouterr().out


def test_basic_auth(tmp_path, monkeypatch):
    _require("flask_wtf", "--auth")
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    home = tmp_path / "auth"
    # No secrets in the environment: refused before anything starts.
    with pytest.raises(ServerError, match="MLFLOW_AUTH_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY"):
        start_server(home, port=0, auth=True)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD)
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "test-secret-key")

    info = start_server(home, port=0, auth=True, auth_default_permission="NO_PERMISSIONS")
    try:
        ini = home / "basic_auth.ini"
        assert ini.stat().st_mode & 0o777 == 0o600
        assert "auth_cache_ttl_seconds = 60" in ini.read_text()  # a checked login is trusted for a minute
        assert ADMIN_PASSWORD not in (home / "server.json").read_text()
        assert ADMIN_PASSWORD not in (home / "mlflow-server.log").read_text()

        req = urllib.request.Request(f"{info.url}/api/2.0/mlflow/experiments/search?max_results=1")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        exp_id, run_id = _log_run(info.url, tmp_path)
        other_exp = mlflow.MlflowClient(tracking_uri=info.url).create_experiment("private")

        # The README's read-only auditor: READ on one experiment, nothing else.
        auth_client = get_app_client("basic-auth", tracking_uri=info.url)
        auth_client.create_user("auditor", "auditor-pw-0123456")
        auth_client.grant_user_permission("auditor", "experiment", exp_id, "READ")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "auditor")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "auditor-pw-0123456")
        auditor = mlflow.MlflowClient(tracking_uri=info.url)
        assert auditor.get_run(run_id).data.metrics["objective/rlhf_reward"] == 0.75
        for forbidden in (
            lambda: auditor.log_metric(run_id, "x", 1.0),
            lambda: auditor.create_run(exp_id),
            lambda: auditor.get_experiment(other_exp),
        ):
            with pytest.raises(MlflowException, match="403"):
                forbidden()
        # the login cache holds checked logins only: the auditor's name with another password is refused
        wrong = urllib.request.Request(
            f"{info.url}/api/2.0/mlflow/runs/get?run_id={run_id}",
            headers={"Authorization": "Basic " + base64.b64encode(b"auditor:not-the-password-0").decode()},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(wrong, timeout=10)
        assert err.value.code == 401
    finally:
        assert stop_server(home) is True
    assert _gone(info.pid)


def test_port_taken_and_failed_start_are_clean(tmp_path):
    home = tmp_path / "busy"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServerError) as err:
            start_server(home, port=port)
    msg = str(err.value)
    assert f"port {port} on 127.0.0.1 is already in use" in msg
    assert str(home.resolve() / "mlflow-server.log") in msg and "\n" not in msg
    assert not (home / "mlflow-server.pid").exists()

    # A start that does not become healthy in time is killed, with the log named.
    with pytest.raises(ServerError, match=r"did not answer within 1 s \(log: ") as err:
        start_server(home, port=0, timeout=1.0)
    assert "\n" not in str(err.value)
    assert not (home / "mlflow-server.pid").exists()
    assert _live_procs_mentioning(str(home.resolve())) == []


def test_stop_leaves_a_foreign_pid_alone(tmp_path):
    home = tmp_path / "foreign"
    home.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (home / "mlflow-server.pid").write_text(f"{sleeper.pid}\n")
        assert stop_server(home) is False
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_postgres_backend(tmp_path):
    bindir = pg.find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install -y postgresql")
    _require("psycopg", "--backend postgres")
    import mlflow

    # As root the cluster runs as the `postgres` user, which cannot enter pytest's 0700
    # tmp_path; use a traversable directory of our own.
    base = Path(tempfile.mkdtemp(prefix="ppoflow-pg-test-"))
    base.chmod(0o711)
    home = base / "srv"
    try:
        info = start_server(home, port=0, backend="postgres")
        try:
            assert info.backend == "postgres" and info.postgres["managed"]
            assert info.backend_uri.startswith("postgresql+psycopg://mlflow@127.0.0.1:")
            assert ":" not in info.backend_uri.split("//", 1)[1].split("@")[0]  # no password
            assert (home / "pgpass").stat().st_mode & 0o777 == 0o600
            _, run_id = _log_run(info.url, tmp_path)
            run = mlflow.MlflowClient(tracking_uri=info.url).get_run(run_id)
            assert run.data.metrics["objective/rlhf_reward"] == 0.75
            assert list((home / "artifacts").rglob("eval.json"))
            # The run really is in PostgreSQL.
            out = subprocess.run(
                [
                    str(bindir / "psql"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(info.postgres["port"]),
                    "-U",
                    "mlflow",
                    "-w",
                    "-d",
                    "mlflow",
                    "-tAc",
                    f"SELECT value FROM metrics WHERE run_uuid = '{run_id}'",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PGPASSFILE": str(home / "pgpass")},
            )
            assert out.stdout.strip() == "0.75", out.stderr
            approvals_out_of_order(info.url, run_id, tmp_path)
        finally:
            assert stop_server(home) is True
        assert _gone(info.pid)
        cluster = pg.Cluster(home.resolve())
        assert not pg.is_running(cluster, bindir)
        assert stop_server(home) is False
    finally:
        shutil.rmtree(base, ignore_errors=True)
