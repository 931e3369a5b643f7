"""Start `ppoflow train` processes for the fault tests, fast.

Importing the engine (torch, transformers, datasets) takes 5-20 s on these 2-core machines, and the
SIGKILL campaign restarts `ppoflow train` a dozen times. `WarmLauncher` imports the engine once in a
helper process and forks it for each start: every start is a separate OS process running exactly
`ppoflow.cli.main(["train", ...])`, with its own pid, log file and environment, killed with a real
SIGKILL. Only the imports are shared. `ColdLauncher` starts `python -m ppoflow.cli` each time
instead (the uninterrupted reference runs always start cold; `PPOFLOW_RELIABILITY_COLD=1` makes every
start cold).

Run as a script, this file is the helper: JSON requests on stdin, JSON events on stdout
(`ready`, `started` with the pid, `exited` with the exit code).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class Child:
    """A started `ppoflow train` process."""

    def __init__(self, pid: int, launcher: WarmLauncher | ColdLauncher, popen: subprocess.Popen | None = None):
        self.pid = pid
        self.started = time.monotonic()
        self._launcher = launcher
        self._popen = popen

    def poll(self) -> int | None:
        if self._popen is not None:
            return self._popen.poll()
        return self._launcher.exit_code(self.pid)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.pid} still running after {timeout:.0f} s")
            time.sleep(0.01)
        return code

    def kill(self) -> int:
        """SIGKILL, then reap; returns the exit code (-9, or the code if it had already exited)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.wait(60)


class ColdLauncher:
    """`python -m ppoflow.cli ARGV` in a fresh interpreter each time."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
        with open(log, "ab") as handle:
            popen = subprocess.Popen(
                [sys.executable, "-m", "ppoflow.cli", *argv],
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
            )
        return Child(popen.pid, self, popen)

    def close(self) -> None:
        pass


class WarmLauncher:
    """Forks `ppoflow train` processes from a helper that has imported the engine once."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self._process = subprocess.Popen(
            [sys.executable, __file__],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._events: dict[str, dict] = {}
        self._exits: dict[int, int] = {}
        self._changed = threading.Condition()
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._await("ready", timeout=300)

    def _read(self) -> None:
        for line in self._process.stdout:
            event = json.loads(line)
            with self._changed:
                if event["event"] == "exited":
                    self._exits[event["pid"]] = event["code"]
                else:
                    self._events[event.get("id", event["event"])] = event
                self._changed.notify_all()

    def _await(self, key: str, timeout: float) -> dict:
        with self._changed:
            if not self._changed.wait_for(lambda: key in self._events or self._process.poll() is not None, timeout):
                raise TimeoutError(f"launcher did not report {key!r} in {timeout} s")
            if key not in self._events:
                raise RuntimeError(f"launcher exited with {self._process.poll()}")
            return self._events.pop(key)

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            return self._exits.get(pid)

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
        self._next_id += 1
        request_id = str(self._next_id)
        request = {"id": request_id, "argv": argv, "log": str(log), "env": env or {}}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        return Child(self._await(request_id, timeout=60)["pid"], self)

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)


def make_launcher(env: dict[str, str]) -> WarmLauncher | ColdLauncher:
    return ColdLauncher(env) if os.environ.get("PPOFLOW_RELIABILITY_COLD") == "1" else WarmLauncher(env)


# ------------------------------------------------------------------------------------------------
# The helper process


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _run_child(request: dict) -> None:
    """In the forked child: become `ppoflow train` with the request's argv, log and environment."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(request["env"])
        from ppoflow.cli import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    sys.path.insert(0, str(REPO))
    import ppoflow.cli  # noqa: F401 - the expensive imports, done once
    import ppoflow.pipeline  # noqa: F401

    _emit({"event": "ready"})
    buffered = b""
    stdin = sys.stdin.fileno()
    open_stdin = True
    children = 0
    while open_stdin or children:
        if open_stdin and select.select([stdin], [], [], 0.01)[0]:
            chunk = os.read(stdin, 1 << 16)
            open_stdin = bool(chunk)
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                request = json.loads(line)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _run_child(request)
                children += 1
                _emit({"event": "started", "id": request["id"], "pid": pid})
        elif not open_stdin:
            time.sleep(0.01)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children -= 1
            _emit({"event": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
