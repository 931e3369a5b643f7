"""A private PostgreSQL cluster under the server home, for the MLflow backend store.

Debian's server binaries live in ``/usr/lib/postgresql/<major>/bin`` (``apt-get install -y
postgresql``); they are not on ``PATH``. PostgreSQL refuses to run as root, so when we are root the
cluster belongs to the ``postgres`` system user and every server-side command runs through
``runuser -u postgres --`` (or ``su`` where ``runuser`` is missing).

Layout under ``HOME``::

    postgres/            owned by the cluster's OS user, mode 0700
      data/              the cluster (initdb)
      postgres.log       pg_ctl's log
    pgpass               libpq password file for the ``mlflow`` role (ours, mode 0600)

The cluster listens on 127.0.0.1 only (no Unix socket: socket paths are limited to ~107 bytes)
with scram-sha-256 password auth. The password lives only in ``pgpass``; the backend URI handed
to MLflow carries no password and libpq finds it through ``PGPASSFILE``.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_log = logging.getLogger(__name__)

DB_NAME = "mlflow"
DB_USER = "mlflow"
PG_OS_USER = "postgres"
INSTALL_HINT = "apt-get update && apt-get install -y postgresql"


class PostgresError(RuntimeError):
    """The private cluster could not be set up, started or stopped."""


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding initdb and pg_ctl (or PATH's)."""
    found = []
    for cand in glob.glob("/usr/lib/postgresql/*/bin"):
        bindir = Path(cand)
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            major = re.match(r"\d+", bindir.parent.name)
            found.append((int(major.group()) if major else 0, bindir))
    if found:
        return max(found)[1]
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


@dataclass(frozen=True)
class Cluster:
    home: Path  # the MLflow server home

    @property
    def root(self) -> Path:
        return self.home / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def pgpass(self) -> Path:
        return self.home / "pgpass"

    def uri(self, port: int) -> str:
        # No password here: libpq reads it from PGPASSFILE (see client_env).
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"  # psycopg 3 (the server extra)

    def client_env(self) -> dict[str, str]:
        return {"PGPASSFILE": str(self.pgpass)}


def _as_root() -> bool:
    return os.geteuid() == 0


def _os_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError as exc:
        raise PostgresError(
            f"running as root, PostgreSQL needs the '{PG_OS_USER}' system user, which does not "
            f"exist ({INSTALL_HINT} creates it)"
        ) from exc


def _server_cmd(argv: list[str]) -> list[str]:
    """Run a server-side PostgreSQL command as a non-root user when we are root."""
    if not _as_root():
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", PG_OS_USER, "--", *argv]
    return ["su", "-s", "/bin/sh", PG_OS_USER, "-c", shlex.join(argv)]


def _run(
    argv: list[str], *, what: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess:
    _log.debug("running %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as exc:
        raise PostgresError(f"{what} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit {proc.returncode}"
        raise PostgresError(f"{what} failed: {last}")
    return proc


def _check_reachable(path: Path, uid: int, gids: set[int]) -> None:
    """The postgres OS user must be able to traverse every directory above its data dir."""
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in gids:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            raise PostgresError(
                f"PostgreSQL runs as the '{PG_OS_USER}' user, which cannot enter {parent} "
                f"(mode {st.st_mode & 0o777:04o}); put --home under a directory it can traverse "
                "or pass --backend-uri postgresql://... for an existing server"
            )


def ensure_initialised(cluster: Cluster, bindir: Path) -> bool:
    """initdb the cluster unless it exists; True if it was created now."""
    if (cluster.data_dir / "PG_VERSION").is_file():
        if not cluster.pgpass.is_file():
            raise PostgresError(f"{cluster.data_dir} exists but its password file {cluster.pgpass} is missing")
        return False
    cluster.root.mkdir(parents=True, exist_ok=True)
    owner = None
    if _as_root():
        owner = _os_user()
        gids = {owner.pw_gid, *(g for g in os.getgrouplist(PG_OS_USER, owner.pw_gid))}
        # Only traversal (not listing) for others on the home we own.
        os.chmod(cluster.home, os.stat(cluster.home).st_mode | 0o111)
        _check_reachable(cluster.root, owner.pw_uid, gids)
        os.chown(cluster.root, owner.pw_uid, owner.pw_gid)
    os.chmod(cluster.root, 0o700)

    password = secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: nothing to escape in pgpass
    fd = os.open(cluster.pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"127.0.0.1:*:*:{DB_USER}:{password}\n")
    os.chmod(cluster.pgpass, 0o600)

    pwfile = cluster.root / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    if owner is not None:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    try:
        _run(
            _server_cmd(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(cluster.data_dir),
                    "-U",
                    DB_USER,
                    f"--pwfile={pwfile}",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ]
            ),
            what="initdb",
        )
    finally:
        pwfile.unlink(missing_ok=True)
    with open(cluster.data_dir / "postgresql.conf", "a") as fh:
        fh.write(
            "\n# ppoflow mlflow_server: loopback TCP only\n"
            "listen_addresses = '127.0.0.1'\n"
            "unix_socket_directories = ''\n"
        )
    _log.info("initialised PostgreSQL cluster in %s", cluster.data_dir)
    return True


def is_running(cluster: Cluster, bindir: Path) -> bool:
    if not (cluster.data_dir / "postmaster.pid").exists():
        return False
    proc = subprocess.run(
        _server_cmd([str(bindir / "pg_ctl"), "-D", str(cluster.data_dir), "status"]),
        capture_output=True,
        text=True,
        cwd="/",
    )
    return proc.returncode == 0


def postmaster_pid(cluster: Cluster) -> int | None:
    try:
        return int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def start(cluster: Cluster, bindir: Path, port: int, *, timeout: float = 60.0) -> int:
    """Start the cluster on 127.0.0.1:port, create the database if needed; returns its pid."""
    if is_running(cluster, bindir):
        raise PostgresError(f"the PostgreSQL cluster in {cluster.data_dir} is already running (stop it first)")
    _run(
        _server_cmd(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(cluster.data_dir),
                "-l",
                str(cluster.log_file),
                "-w",
                "-t",
                str(int(timeout)),
                "-o",
                f"-p {int(port)}",
                "start",
            ]
        ),
        what=f"starting PostgreSQL (log: {cluster.log_file})",
        timeout=timeout + 30,
    )
    env = cluster.client_env()
    common = ["-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, "-w"]
    exists = _run(
        [
            str(bindir / "psql"),
            *common,
            "-d",
            "postgres",
            "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'",
        ],
        what="checking the mlflow database",
        env=env,
    )
    if exists.stdout.strip() != "1":
        _run([str(bindir / "createdb"), *common, DB_NAME], what="createdb", env=env)
        _log.info("created database %s", DB_NAME)
    return postmaster_pid(cluster) or 0


def stop(cluster: Cluster, bindir: Path | None = None, *, timeout: float = 60.0) -> bool:
    """Stop the cluster if it runs; True if it was running."""
    bindir = bindir or find_bindir()
    if bindir is None or not is_running(cluster, bindir):
        return False
    _run(
        _server_cmd(
            [str(bindir / "pg_ctl"), "-D", str(cluster.data_dir), "-m", "fast", "-w", "-t", str(int(timeout)), "stop"]
        ),
        what="stopping PostgreSQL",
        timeout=timeout + 30,
    )
    _log.info("stopped PostgreSQL cluster in %s", cluster.data_dir)
    return True
