"""The processes ppoflow starts: spawn them, recognise them again, stop them, probe them.

Used by `ppoflow.mlflow_server.server` (the MLflow server), `ppoflow.deployments.serve` (the Prefect server
and its workers), the launches of `accelerate launch` (`ppoflow.machines`, `ppoflow.tasks.launch`) and the
tests; no Prefect or MLflow here. Each process is started in its own session, so it leads a process group that holds
everything it starts, and stopping it signals that group. A recorded pid is trusted only while the
process behind it has the start time recorded at spawn (`start_ticks`: a reused pid has another)
and the expected command line.

psutil reads the process table. The start time is the kernel's own count of clock ticks since boot
(/proc/<pid>/stat field 22) rather than psutil's `create_time()`, which adds a boot time derived
from the wall clock: a reading at `start` and another at a later `stop` could then differ after a
clock adjustment, and a server would be left running as "not ours".
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def spawn(cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str], log_file: Path) -> subprocess.Popen:
    """Start `cmd` in a session of its own, its stdout and stderr appended to `log_file`."""
    with open(log_file, "ab") as handle:
        return subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_ticks(pid: int) -> int | None:
    """When pid started, in clock ticks since boot; None without /proc or without such a process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[19])  # the command name may hold spaces and parens


def alive(pid: int) -> bool:
    """Whether pid is a process other than a zombie (a zombie child of ours is reaped)."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    if status in _GONE:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child: init reaps it
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process other than a zombie remains in process group pgid."""
    for pid in psutil.pids():
        try:
            member = os.getpgid(pid) == pgid
        except OSError:
            continue
        if member and alive(pid):
            return True
    return False


def cmdline(pid: int) -> str:
    """pid's command line, its arguments joined by spaces ("" when it cannot be read)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def cwd(pid: int) -> str:
    """pid's working directory ("" when it cannot be read)."""
    try:
        return psutil.Process(pid).cwd()
    except psutil.Error:
        return ""


def running(pid: int, ticks: int | None = None, words: Sequence[str] = ()) -> bool:
    """pid is alive, started at `ticks` (when both that and its start time are known) and its
    command line holds every one of `words`."""
    if not alive(pid):
        return False
    started = start_ticks(pid)
    if ticks is not None and started is not None and started != ticks:
        return False
    command = cmdline(pid)
    return all(word in command for word in words)


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def terminate_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group pid leads (pid alone if it leads none), SIGKILL after timeout s."""
    try:
        leads = os.getpgid(pid) == pid
    except ProcessLookupError:
        return

    def send(sig: int) -> None:
        try:
            if leads:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def gone() -> bool:
        return not (group_alive(pid) if leads else alive(pid))

    send(signal.SIGTERM)
    if _wait(gone, timeout):
        return
    log.warning("pid %d did not exit %.0f s after SIGTERM; sending SIGKILL", pid, timeout)
    send(signal.SIGKILL)
    _wait(gone, 10)


def tail(path: str | Path, lines: int = 3) -> str:
    """The last non-empty lines of a log file, joined by " | " ("" if it cannot be read)."""
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """Status code of GET url (proxies bypassed), or None if nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at the moment: the OS picks it, then it is released."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether a server holds host:port. uvicorn binds with SO_REUSEADDR too, so a port left in
    TIME_WAIT by a stopped server counts as free."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False
