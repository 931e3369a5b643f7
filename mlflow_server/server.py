"""Start, stop and inspect a real MLflow tracking server for ppoflow.

    python -m ppoflow.mlflow_server.server start [--port 0] [--backend sqlite|postgres] [--auth] ...
    python -m ppoflow.mlflow_server.server status
    python -m ppoflow.mlflow_server.server stop

Everything the server owns lives in one home directory (default ``.ppoflow/mlflow-server``):

    server.json          url, pid, backend (password redacted), artifacts, log, state
    mlflow-server.pid    the pid of the ``mlflow server`` process (leader of its own session)
    mlflow-server.log    the server's stdout and stderr, appended across starts
    mlflow.db            SQLite backend store (``--backend sqlite``)
    artifacts/           artifacts destination, served through the server (mlflow-artifacts:)
    basic_auth.ini/.db   auth config (mode 0600) and user store (``--auth``)
    postgres/, pgpass    private PostgreSQL cluster and its password (``--backend postgres``)

The library functions (``start_server``, ``stop_server``, ``server_status``) never print; they
log and raise ``ServerError`` with a one-line message. ``main()`` is the CLI.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import importlib.util
import io
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ppoflow import processes
from ppoflow.mlflow_server import postgres as pg
from ppoflow.redaction import redact_uri

_log = logging.getLogger(__name__)

DEFAULT_HOME = Path(".ppoflow") / "mlflow-server"
DEFAULT_PORT = 5000
SERVER_JSON = "server.json"
PID_FILE = "mlflow-server.pid"
LOG_FILE = "mlflow-server.log"
AUTH_INI = "basic_auth.ini"
AUTH_DB = "basic_auth.db"
DEFAULT_AUTH_CACHE_SECONDS = 60  # a changed password or deleted user is honoured within a minute

ENV_ADMIN_PASSWORD = "MLFLOW_AUTH_ADMIN_PASSWORD"
ENV_ADMIN_USERNAME = "MLFLOW_AUTH_ADMIN_USERNAME"
ENV_SECRET_KEY = "MLFLOW_FLASK_SERVER_SECRET_KEY"
AUTH_PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
EXTRA_HINT = "pip install 'ppoflow[server]'"
_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class ServerError(RuntimeError):
    """Start/stop failed; the message is one line meant for the user."""


@dataclass
class ServerInfo:
    url: str
    pid: int
    host: str
    port: int
    backend: str  # "sqlite" | "postgres"
    backend_uri: str  # password redacted
    artifacts_destination: str
    home: str
    log_file: str
    auth: bool = False
    auth_config: str | None = None
    started_at: str = ""
    startup_seconds: float = 0.0
    mlflow_version: str = ""
    proc_start_ticks: int | None = None  # /proc/<pid>/stat field 22: guards against pid reuse
    postgres: dict[str, Any] | None = None  # the private cluster we manage, if any
    state: str = "running"

    @property
    def export_line(self) -> str:
        return f"export MLFLOW_TRACKING_URI={self.url}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- helpers


def _postgres_driver(uri: str) -> str | None:
    """The DB-API module SQLAlchemy will import for ``uri`` (None if unknown).

    SQLAlchemy 2.0 maps plain ``postgresql://`` to psycopg2, 2.1 to psycopg (3); the private
    cluster's URI names ``postgresql+psycopg://`` (the server extra's driver) so both agree.
    """
    try:
        from sqlalchemy.engine import make_url

        return make_url(uri).get_dialect().driver
    except Exception:  # noqa: BLE001 - let MLflow report odd URIs itself
        return None


def _client_host(host: str) -> str:
    if host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    return processes.http_status(url.rstrip("/") + "/health", timeout) == 200


def _is_ours(pid: int, home: Path, start_ticks: int | None) -> bool:
    """The process is an ``mlflow server`` started from this home (and not a reused pid)."""
    if not processes.running(pid, start_ticks, ("mlflow", "server")):
        return False
    return str(home) in processes.cmdline(pid) or processes.cwd(pid) == str(home)


def _log_line(log_file: Path, message: str) -> None:
    with open(log_file, "a") as fh:
        fh.write(f"[mlflow_server {datetime.now(timezone.utc).isoformat(timespec='seconds')}] {message}\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _write_secret_file(path: Path, text: str) -> None:
    """Write text to path with mode 0600 from the first byte (no window where it is readable)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _mlflow_version() -> str:
    try:
        from importlib.metadata import version

        return version("mlflow")
    except Exception:  # noqa: BLE001 - informational only
        return ""


def read_info(home: Path) -> ServerInfo | None:
    path = Path(home).resolve() / SERVER_JSON
    try:
        return ServerInfo.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _read_pid(home: Path) -> int | None:
    try:
        return int((home / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- auth


def _auth_config(home: Path, default_permission: str, cache_seconds: int) -> Path:
    """Validate the auth env vars and write HOME/basic_auth.ini (0600: holds the admin password).

    MLflow 3.17's basic-auth app reads the file named by MLFLOW_AUTH_CONFIG_PATH
    (mlflow/server/auth/config.py); with no admin in its user store it creates one from
    ``admin_password`` (or MLFLOW_AUTH_ADMIN_PASSWORD, which wins when set) and refuses to start
    without one. The Flask secret key has no file setting: it stays an env var.

    ``cache_seconds``: how long the server trusts a login it has checked (MLflow's
    ``auth_cache_ttl_seconds``; 0 checks every request). Each check is a deliberately slow
    password hash (scrypt, ~0.1 s of a core), and a flow run's stage 6 makes a few hundred
    requests. A password changed or a user deleted is honoured once the cached login expires.
    """
    password = os.environ.get(ENV_ADMIN_PASSWORD, "")
    secret_key = os.environ.get(ENV_SECRET_KEY, "")
    missing = [name for name, value in ((ENV_ADMIN_PASSWORD, password), (ENV_SECRET_KEY, secret_key)) if not value]
    if missing:
        raise ServerError(
            f"--auth needs {' and '.join(missing)} set in the environment "
            "(secrets come only from there; there are no defaults)"
        )
    if len(password) < 12:
        raise ServerError(f"{ENV_ADMIN_PASSWORD} is too short: MLflow requires at least 12 characters")
    if password == "password1234":
        raise ServerError(f"{ENV_ADMIN_PASSWORD} is MLflow's old published default; pick another")
    if importlib.util.find_spec("flask_wtf") is None:
        raise ServerError(f"--auth needs mlflow[auth] (Flask-WTF), which is not installed: {EXTRA_HINT}")
    if cache_seconds < 0:
        raise ServerError(f"--auth-cache-seconds is {cache_seconds}: give 0 (check every request) or more")
    if default_permission not in AUTH_PERMISSIONS:
        raise ServerError(
            f"unknown auth default permission {default_permission!r}; choose one of {', '.join(AUTH_PERMISSIONS)}"
        )
    cfg = configparser.ConfigParser(interpolation=None)
    cfg["mlflow"] = {
        "default_permission": default_permission,
        "database_uri": f"sqlite:///{home / AUTH_DB}",
        "admin_username": os.environ.get(ENV_ADMIN_USERNAME) or "admin",
        "admin_password": password,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
        "auth_cache_ttl_seconds": str(cache_seconds),
    }
    buf = io.StringIO()
    buf.write("# written by `ppoflow.mlflow_server.server start --auth`: holds the admin password (0600)\n")
    cfg.write(buf)
    path = home / AUTH_INI
    _write_secret_file(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------- start / stop


def start_server(
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    backend: str = "sqlite",
    backend_uri: str | None = None,
    artifacts_destination: str | Path | None = None,
    auth: bool = False,
    auth_default_permission: str = "READ",
    auth_cache_seconds: int = DEFAULT_AUTH_CACHE_SECONDS,
    workers: int = 1,
    enable_jobs: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
) -> ServerInfo:
    """Start ``mlflow server`` in the background from ``home`` and wait until /health answers.

    ``port=0`` picks a free port. ``backend="sqlite"`` uses ``HOME/mlflow.db`` unless
    ``backend_uri`` is given; ``backend="postgres"`` uses ``backend_uri`` if given, else
    initialises and starts a private PostgreSQL cluster under ``home``. Raises ServerError (with
    the log path) if the port is taken, a prerequisite is missing or startup fails; whatever was
    half-started is stopped first.
    """
    home = Path(home).expanduser().resolve()
    if not home.exists():
        home.mkdir(parents=True)
        home.chmod(0o700)  # stores, auth db and secrets: ours only (postgres adds o+x)
    log_file = home / LOG_FILE
    if backend not in ("sqlite", "postgres"):
        raise ServerError(f"unknown backend {backend!r}: use sqlite or postgres")
    if workers < 1:
        raise ServerError("--workers must be at least 1")

    previous = read_info(home)
    pid = _read_pid(home)
    if pid is not None and _is_ours(pid, home, previous.proc_start_ticks if previous else None):
        where = previous.url if previous else f"pid {pid}"
        raise ServerError(f"an MLflow server from {home} is already running ({where}, pid {pid}); stop it first")
    (home / PID_FILE).unlink(missing_ok=True)

    if port == 0:
        port = processes.free_port(host if host not in _WILDCARD_HOSTS else "127.0.0.1")
    elif processes.port_in_use(host, port):
        msg = f"port {port} on {host} is already in use; pick another --port (or --port 0 for a free one)"
        _log_line(log_file, "start refused: " + msg)
        raise ServerError(f"{msg} (log: {log_file})")
    if host not in _LOOPBACK_HOSTS:
        _log.warning(
            "binding %s: the server is reachable from other machines%s",
            host,
            "" if auth else " WITHOUT authentication (consider --auth)",
        )

    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # MLflow's background job runner (GenAI scorers, trace rollups) starts 7 huey consumers and
    # adds ~3 s to startup; ppoflow needs none of it.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if enable_jobs else "false"

    # Checked before anything starts: a missing secret must not leave a PostgreSQL running.
    auth_ini = _auth_config(home, auth_default_permission, auth_cache_seconds) if auth else None

    # Backend store.
    pg_info: dict[str, Any] | None = None
    cluster: pg.Cluster | None = None
    bindir: Path | None = None
    if backend == "postgres":
        driver = _postgres_driver(backend_uri or "postgresql+psycopg://")
        if driver and importlib.util.find_spec(driver) is None:
            raise ServerError(f"--backend postgres needs the {driver} driver, which is not installed: {EXTRA_HINT}")
        if backend_uri is None:
            bindir = pg.find_bindir()
            if bindir is None:
                raise ServerError(
                    "--backend postgres without --backend-uri needs PostgreSQL's "
                    f"server binaries (initdb, pg_ctl): {pg.INSTALL_HINT}"
                )
            cluster = pg.Cluster(home)
            pg_port = processes.free_port("127.0.0.1")
            try:
                created = pg.ensure_initialised(cluster, bindir)
                pg_pid = pg.start(cluster, bindir, pg_port)
            except pg.PostgresError as exc:
                try:
                    pg.stop(cluster, bindir)
                except pg.PostgresError:
                    pass
                raise ServerError(f"{exc} (log: {cluster.log_file})") from exc
            backend_uri = cluster.uri(pg_port)
            env.update(cluster.client_env())
            pg_info = {
                "managed": True,
                "data_dir": str(cluster.data_dir),
                "port": pg_port,
                "pid": pg_pid,
                "bindir": str(bindir),
                "log_file": str(cluster.log_file),
                "initialised_now": created,
            }
        elif not backend_uri.startswith("postgresql"):
            raise ServerError("--backend postgres needs a postgresql:// --backend-uri")
    else:
        backend_uri = backend_uri or f"sqlite:///{home / 'mlflow.db'}"

    def stop_pg() -> None:
        if cluster is not None:
            try:
                pg.stop(cluster, bindir)
            except pg.PostgresError as exc:
                _log.error("could not stop PostgreSQL: %s", exc)

    # Artifacts, served through the server (clients see mlflow-artifacts:/ URIs).
    if artifacts_destination is None:
        artifacts_destination = home / "artifacts"
    artifacts_destination = str(artifacts_destination)
    if "://" not in artifacts_destination:
        artifacts_path = Path(artifacts_destination).expanduser().resolve()
        artifacts_path.mkdir(parents=True, exist_ok=True)
        artifacts_destination = str(artifacts_path)

    # The backend URI goes through the environment, never the command line (ps shows argv to
    # every user, and a user-supplied postgres URI may hold a password).
    env["MLFLOW_BACKEND_STORE_URI"] = backend_uri
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--artifacts-destination",
        artifacts_destination,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if auth_ini is not None:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_ini)
        env.pop(ENV_ADMIN_PASSWORD, None)  # read from the 0600 file instead
        cmd += ["--app-name", "basic-auth"]
    cmd += list(extra_args)

    _log_line(log_file, f"starting: {' '.join(cmd)} (backend {redact_uri(backend_uri)})")
    t0 = time.monotonic()
    proc = processes.spawn(cmd, cwd=home, env=env, log_file=log_file)
    (home / PID_FILE).write_text(f"{proc.pid}\n")
    start_ticks = processes.start_ticks(proc.pid)
    url = f"http://{_client_host(host)}:{port}"

    def fail(reason: str) -> ServerError:
        processes.terminate_group(proc.pid, timeout=10)
        proc.poll()
        (home / PID_FILE).unlink(missing_ok=True)
        stop_pg()
        _log_line(log_file, f"start failed: {reason}")
        return ServerError(f"MLflow server failed to start: {reason} (log: {log_file})")

    deadline = t0 + timeout
    while True:
        code = proc.poll()
        if code is not None:
            tail = processes.tail(log_file)
            raise fail(f"process exited with code {code}" + (f": {tail}" if tail else ""))
        if is_healthy(url, timeout=1.0):
            break
        if time.monotonic() > deadline:
            raise fail(f"GET {url}/health did not answer within {timeout:.0f} s")
        time.sleep(0.25)
    elapsed = time.monotonic() - t0

    info = ServerInfo(
        url=url,
        pid=proc.pid,
        host=host,
        port=port,
        backend=backend,
        backend_uri=redact_uri(backend_uri),
        artifacts_destination=artifacts_destination,
        home=str(home),
        log_file=str(log_file),
        auth=auth,
        auth_config=str(auth_ini) if auth_ini else None,
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        startup_seconds=round(elapsed, 2),
        mlflow_version=_mlflow_version(),
        proc_start_ticks=start_ticks,
        postgres=pg_info,
    )
    if auth and (home / AUTH_DB).exists():
        (home / AUTH_DB).chmod(0o600)  # password hashes
    _write_json(home / SERVER_JSON, info.to_dict())
    _log_line(log_file, f"ready at {url} after {elapsed:.1f} s (pid {proc.pid})")
    _log.info("MLflow server ready at %s (pid %d, %.1f s)", url, proc.pid, elapsed)
    return info


def stop_server(home: Path, *, timeout: float = 30.0) -> bool:
    """Stop what ``start_server`` started in ``home``; False if nothing was running.

    Only a process that is really ours gets a signal: its cmdline names mlflow server, it runs
    from this home (cwd or cmdline) and its start time matches the one recorded at start.
    """
    home = Path(home).expanduser().resolve()
    info = read_info(home)
    stopped = False
    pid = _read_pid(home)
    if pid is not None:
        if _is_ours(pid, home, info.proc_start_ticks if info else None):
            _log.info("stopping MLflow server pid %d", pid)
            processes.terminate_group(pid, timeout)
            if processes.alive(pid):
                raise ServerError(f"MLflow server pid {pid} is still alive after SIGKILL")
            stopped = True
        elif processes.alive(pid):
            _log.warning("pid file names pid %d, which is not an MLflow server from %s; left alone", pid, home)
        (home / PID_FILE).unlink(missing_ok=True)
    if info is not None and info.postgres and info.postgres.get("managed"):
        bindir = Path(info.postgres["bindir"]) if info.postgres.get("bindir") else None
        try:
            stopped = pg.stop(pg.Cluster(home), bindir) or stopped
        except pg.PostgresError as exc:
            raise ServerError(f"{exc} (log: {info.postgres.get('log_file')})") from exc
    if info is not None and info.state != "stopped":
        info.state = "stopped"
        _write_json(home / SERVER_JSON, info.to_dict())
    if stopped:
        _log_line(home / LOG_FILE, "stopped")
    return stopped


def server_status(home: Path) -> tuple[ServerInfo | None, bool, bool]:
    """(recorded info, process running, /health answers)."""
    home = Path(home).expanduser().resolve()
    info = read_info(home)
    pid = _read_pid(home)
    running = pid is not None and _is_ours(pid, home, info.proc_start_ticks if info else None)
    healthy = bool(running and info and is_healthy(info.url))
    return info, running, healthy


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ppoflow.mlflow_server.server",
        description="Start/stop a real MLflow tracking server (SQLite or PostgreSQL backend).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add_home(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--home", type=Path, default=DEFAULT_HOME, help=f"server home directory (default: ./{DEFAULT_HOME})"
        )
        sp.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")

    s = sub.add_parser(
        "start",
        help="start the server and wait until it is healthy",
        epilog="Arguments after -- go to `mlflow server` unchanged.",
    )
    add_home(s)
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    s.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    s.add_argument(
        "--backend-uri",
        default=None,
        help="existing store, e.g. postgresql://user:pw@host:5432/db "
        "(default: HOME/mlflow.db, or a private PostgreSQL cluster in HOME)",
    )
    s.add_argument(
        "--artifacts-destination", default=None, help="where served artifacts are stored (default: HOME/artifacts)"
    )
    s.add_argument("--auth", action="store_true", help=f"basic auth; needs {ENV_ADMIN_PASSWORD} and {ENV_SECRET_KEY}")
    s.add_argument(
        "--auth-default-permission",
        default="READ",
        choices=AUTH_PERMISSIONS,
        help="permission of users on resources they hold no grant on (default READ)",
    )
    s.add_argument(
        "--auth-cache-seconds",
        type=int,
        default=DEFAULT_AUTH_CACHE_SECONDS,
        help="how long a checked login is trusted before its password is hashed again "
        f"(default {DEFAULT_AUTH_CACHE_SECONDS}; 0: every request)",
    )
    s.add_argument("--workers", type=int, default=1)
    s.add_argument(
        "--enable-jobs", action="store_true", help="run MLflow's background job runner (off: ppoflow does not need it)"
    )
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for GET /health (default 120)")
    s.add_argument("extra", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    t = sub.add_parser("stop", help="stop the server (and its private PostgreSQL)")
    add_home(t)
    t.add_argument("--timeout", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL (default 30)")

    st = sub.add_parser("status", help="print server.json and whether the server is healthy")
    add_home(st)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "start":
            extra = list(args.extra)
            if extra and extra[0] == "--":
                extra = extra[1:]
            info = start_server(
                args.home,
                host=args.host,
                port=args.port,
                backend=args.backend,
                backend_uri=args.backend_uri,
                artifacts_destination=args.artifacts_destination,
                auth=args.auth,
                auth_default_permission=args.auth_default_permission,
                auth_cache_seconds=args.auth_cache_seconds,
                workers=args.workers,
                enable_jobs=args.enable_jobs,
                extra_args=extra,
                timeout=args.timeout,
            )
            print(
                f"MLflow server ready at {info.url} (pid {info.pid}, backend "
                f"{info.backend_uri}, artifacts {info.artifacts_destination}"
                f"{', basic auth' if info.auth else ''}, {info.startup_seconds:.1f} s); "
                f"{info.export_line}"
            )
            return 0
        if args.command == "stop":
            home = Path(args.home).expanduser().resolve()
            if stop_server(home, timeout=args.timeout):
                print(f"MLflow server in {home} stopped")
            else:
                print(f"MLflow server in {home} is not running (nothing to stop)")
            return 0
        info, running, healthy = server_status(args.home)
        home = Path(args.home).expanduser().resolve()
        if info is None:
            print(f"no server.json in {home}: never started here")
            return 3
        print(json.dumps(info.to_dict(), indent=2, sort_keys=True))
        if info.postgres and info.postgres.get("managed"):
            bindir = pg.find_bindir()
            pg_up = bindir is not None and pg.is_running(pg.Cluster(home), bindir)
            print(f"private PostgreSQL in {info.postgres['data_dir']}: {'running' if pg_up else 'stopped'}")
        if healthy:
            print(f"running and healthy at {info.url}; {info.export_line}")
            return 0
        if running:
            print(f"running (pid {info.pid}) but {info.url}/health does not answer")
            return 1
        print("not running")
        return 3
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
