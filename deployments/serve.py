"""`make serve`: a local Prefect server, an MLflow server, the work pool, the deployments, a worker.

    python -m ppoflow.deployments.serve start [--home .ppoflow/serve] [--prefect-port 4200] [--mlflow-port 5000]
                                      [--mlflow-auth] [--no-ui]
    python -m ppoflow.deployments.serve status
    python -m ppoflow.deployments.serve stop

`start` brings the stack up in this order, each step waiting for the previous one to be healthy:

1. `prefect server start` (background, own session; `GET /api/health`; its UI told to call this
   port's API through `PREFECT_UI_API_URL`) and, meanwhile, the MLflow server
   (`mlflow_server.start_server`, SQLite under HOME/mlflow; `GET /health`);
2. the `process` work pool `ppoflow` with concurrency limit 1 (created or updated);
3. `prefect deploy --all --prefect-file deployments/prefect.yaml`, run from the repository root;
4. `prefect worker start --pool ppoflow` (background, own session; it boots while step 3 runs),
   with PREFECT_API_URL and MLFLOW_TRACKING_URI pointing at the two servers and PREFECT_UI_URL at
   the Prefect UI (empty with `--no-ui`), so each flow run tags its MLflow run with its UI page;
   ready once it has heartbeated to the server;
5. with `--alert-webhook URL` (`make serve ALERT_WEBHOOK=URL`): a notification block and three
   automations that POST a message there when a night fails or crashes and when a candidate is
   rejected (`ppoflow.flows.alerts`).

Everything lives in HOME (default `.ppoflow/serve`): `serve.json` (URLs, pids, deployments),
`prefect-server.log`, `deploy.log`, `worker.log`, the Prefect database under `prefect/` (Prefect's
home for every process started here, so your own Prefect profiles are neither used nor changed)
and the MLflow store under `mlflow/`. If a step fails, what was already started is stopped and the
error names the log to read.

`stop` ends exactly what `start` started: a recorded pid is signalled only while its command line
is the expected `prefect ... start` and its start time (from /proc) is the one recorded, so a pid
reused by another process is left alone. The worker goes first (SIGTERM to its process group, which
holds the flow runs it spawned; a run cut short this way is marked Crashed), then the Prefect
server, then the MLflow server.

The Prefect server is spawned like the worker rather than with `prefect server start --background`
and stopped by its recorded pid rather than with `prefect server stop`: Prefect 3.8.8's background
server writes its output to pipes that close when the CLI exits (no log to name when it fails),
stays in the CLI's process group, and `stop` sends SIGTERM to whatever pid PREFECT_HOME/server.pid
names, without checking that it is still the server or waiting for it to exit.

Library functions (`start`, `stop`, `status`) log and raise `ServeError`; only `main` prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ppoflow import processes
from ppoflow.mlflow_server import start_server, stop_server
from ppoflow.mlflow_server.server import ServerError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = Path(__file__).resolve().with_name("prefect.yaml")
DEFAULT_HOME = Path(".ppoflow") / "serve"
WORK_POOL = "ppoflow"
POOL_CONCURRENCY_LIMIT = 1  # one training at a time on this machine's accelerator
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
HOST = "127.0.0.1"
STATE_FILE = "serve.json"

# Settings every Prefect process started here gets (the machine is offline; see ENVIRONMENT.md).
PREFECT_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class ServeError(RuntimeError):
    """A step of start/stop failed; the message is one line meant for the user."""


@dataclass
class Process:
    """A background process we started, and how to recognise it again."""

    pid: int
    start_ticks: int | None  # /proc/<pid>/stat field 22: a reused pid has another
    marker: list[str]  # words its command line must hold
    log_file: str


@dataclass
class Stack:
    home: str
    prefect_url: str
    mlflow_url: str
    work_pool: str
    deployments: list[dict[str, Any]]
    processes: dict[str, Process] = field(default_factory=dict)
    mlflow_home: str = ""
    mlflow_auth: bool = False
    ui: bool = True  # whether the Prefect server serves its UI
    started_at: str = ""
    alerts: list[str] = field(default_factory=list)  # the automations installed (--alert-webhook)
    startup_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    def client_env(self) -> dict[str, str]:
        """What a shell (or a worker) needs to talk to this stack."""
        return {"PREFECT_API_URL": self.api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stack:
        data = dict(data)
        data["processes"] = {name: Process(**proc) for name, proc in data.get("processes", {}).items()}
        return cls(**data)


# --------------------------------------------------------------------------- processes


def is_ours(proc: Process) -> bool:
    """The recorded process still runs, with the same start time and the expected command line."""
    return processes.running(proc.pid, proc.start_ticks, proc.marker)


def _spawn(cmd: Sequence[str], log_file: Path, env: Mapping[str, str], marker: list[str]) -> Process:
    with open(log_file, "ab") as handle:
        handle.write(f"\n[serve {_now()}] starting: {' '.join(cmd)}\n".encode())
    popen = processes.spawn(cmd, cwd=REPO_ROOT, env=env, log_file=log_file)
    return Process(pid=popen.pid, start_ticks=processes.start_ticks(popen.pid), marker=marker, log_file=str(log_file))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def choose_port(requested: int | None, default: int, what: str) -> int:
    """`None`: the conventional port if free, else any free one; 0: any free one; N: N or an error."""
    if requested is None:
        return processes.free_port(HOST) if processes.port_in_use(HOST, default) else default
    if requested == 0:
        return processes.free_port(HOST)
    if processes.port_in_use(HOST, requested):
        raise ServeError(f"port {requested} for the {what} is in use; pick another (0 = any free port)")
    return requested


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


# --------------------------------------------------------------------------- the steps


def prefect_env(home: Path) -> dict[str, str]:
    """Prefect's home for every process of this stack: its database and profiles stay in HOME."""
    return {**PREFECT_ENV, "PREFECT_HOME": str(home / "prefect")}


def prefect_server_env(home: Path, port: int) -> dict[str, str]:
    """The server's environment: no PREFECT_API_URL of yours, and a UI that calls this port's API
    (Prefect's UI calls :4200 on any other port unless PREFECT_UI_API_URL says so)."""
    # PREFECT_UI_URL: the links the automations' notifications carry (`{{ flow_run|ui_url }}`).
    env = {
        **os.environ,
        **prefect_env(home),
        "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",
        "PREFECT_UI_URL": f"http://{HOST}:{port}",
    }
    env.pop("PREFECT_API_URL", None)
    return env


def start_prefect_server(home: Path, port: int, *, ui: bool = True, scheduler: bool = True) -> Process:
    env = prefect_server_env(home, port)
    cmd = _prefect(
        "server",
        "start",
        "--host",
        HOST,
        "--port",
        str(port),
        "--no-prompt",
        "--analytics-off",
        "--ui" if ui else "--no-ui",
        "--scheduler" if scheduler else "--no-scheduler",
    )
    return _spawn(cmd, home / "prefect-server.log", env, marker=["prefect", "server", "start", str(port)])


def wait_healthy(url: str, proc: Process, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while processes.http_status(url) != 200:
        if not processes.alive(proc.pid):
            raise ServeError(
                f"the {what} exited during startup: {processes.tail(proc.log_file)} (log: {proc.log_file})"
            )
        if time.monotonic() > deadline:
            raise ServeError(f"the {what} did not answer {url} within {timeout:.0f} s (log: {proc.log_file})")
        time.sleep(0.5)


def ensure_work_pool(api_url: str, name: str = WORK_POOL, concurrency_limit: int = POOL_CONCURRENCY_LIMIT) -> None:
    """A `process` work pool with the given concurrency limit (created, or its limit set)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with SyncPrefectClient(api_url) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    concurrency_limit=concurrency_limit,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="ppoflow trainings on this machine, one at a time",
                )
            )
            return
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency_limit))


def deploy(home: Path, api_url: str, prefect_file: Path = PREFECT_FILE, timeout: float = 300) -> list[dict[str, Any]]:
    """`prefect deploy --all` from the repository root (so workers run the flow from this checkout)."""
    log_file = home / "deploy.log"
    env = {**os.environ, **prefect_env(home), "PREFECT_API_URL": api_url}
    cmd = _prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
    with open(log_file, "ab") as handle:
        handle.write(f"\n[serve {_now()}] {' '.join(cmd)}\n".encode())
        handle.flush()
        try:
            done = subprocess.run(
                cmd,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise ServeError(f"prefect deploy did not finish within {timeout:.0f} s (log: {log_file})") from None
    if done.returncode != 0:
        raise ServeError(
            f"prefect deploy failed with exit code {done.returncode}: {processes.tail(log_file)} (log: {log_file})"
        )
    return declared_deployments(prefect_file)


def declared_deployments(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """Name, pool and schedules of each deployment the prefect.yaml declares."""
    spec = yaml.safe_load(prefect_file.read_text())
    return [
        {
            "name": f"rlhf-ppo/{entry['name']}",
            "work_pool": entry["work_pool"]["name"],
            "schedules": [
                {key: schedule.get(key) for key in ("cron", "timezone", "active")}
                for schedule in entry.get("schedules") or []
            ],
        }
        for entry in spec["deployments"]
    ]


def worker_name() -> str:
    return f"ppoflow-{socket.gethostname()}"


def start_worker(home: Path, env: Mapping[str, str], *, name: str | None = None, pool: str = WORK_POOL) -> Process:
    """A process worker; `--limit 1` besides the pool's limit: this worker never runs two flow runs."""
    name = name or worker_name()
    cmd = _prefect(
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        "process",
        "--name",
        name,
        "--limit",
        str(POOL_CONCURRENCY_LIMIT),
        "--install-policy",
        "never",
        "--no-prompt",
    )
    log_file = home / ("worker.log" if name == worker_name() else f"worker-{name}.log")
    return _spawn(cmd, log_file, env, marker=["prefect", "worker", "start", name])


def wait_worker_online(
    api_url: str, proc: Process, since: datetime, timeout: float, *, name: str | None = None, pool: str = WORK_POOL
) -> None:
    """Until the worker `name` has sent a heartbeat to the server after `since`."""
    from prefect.client.orchestration import SyncPrefectClient

    name = name or worker_name()
    deadline = time.monotonic() + timeout
    with SyncPrefectClient(api_url) as client:
        while True:
            beats = [
                worker.last_heartbeat_time
                for worker in client.read_workers_for_work_pool(pool)
                if worker.name == name and worker.last_heartbeat_time
            ]
            if any(beat >= since for beat in beats):
                return
            if not processes.alive(proc.pid):
                raise ServeError(
                    f"the worker exited during startup: {processes.tail(proc.log_file)} (log: {proc.log_file})"
                )
            if time.monotonic() > deadline:
                raise ServeError(f"the worker did not reach the server within {timeout:.0f} s (log: {proc.log_file})")
            time.sleep(0.5)


def worker_environment(stack: Stack, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A worker's environment (its flow runs inherit it): this stack's URLs and MLflow login, and the
    Prefect UI a flow run names on its MLflow run (none when the server has no UI: Prefect would
    otherwise derive a UI URL from the API's)."""
    return {
        **os.environ,
        **prefect_env(Path(stack.home)),
        **stack.client_env(),
        "PREFECT_UI_URL": stack.prefect_url if stack.ui else "",
        **mlflow_credentials(stack.mlflow_auth),
        **(extra or {}),
    }


def crash_orphaned_runs(api_url: str, pool: str = WORK_POOL) -> list[str]:
    """Mark Crashed the pool's Pending/Running flow runs whose process is gone; their names.

    A flow run whose process died with its worker (`serve stop`, a reboot, kill -9) stays Running
    on the server and, with the pool's concurrency limit of 1, would block the pool for good.
    `infrastructure_pid` is the flow run's process on this machine (a process worker records it)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    in_flight = FlowRunFilter(
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING])
        )
    )
    crashed = []
    with SyncPrefectClient(api_url) as client:
        for run in client.read_flow_runs(
            flow_run_filter=in_flight, work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
        ):
            pid = run.infrastructure_pid
            if pid and pid.isdigit() and processes.running(int(pid), words=["prefect"]):
                continue
            client.set_flow_run_state(
                run.id,
                Crashed(
                    message="its process is gone (stopped with its worker); "
                    f"retry with `prefect flow-run retry {run.id}`"
                ),
                force=True,
            )
            crashed.append(run.name)
    return crashed


def _crash_interrupted_runs(api_url: str) -> None:
    try:
        for name in crash_orphaned_runs(api_url):
            log.warning("flow run %s lost its process; marked Crashed", name)
    except Exception as exc:  # noqa: BLE001 - the server may be unwell: stopping must go on
        log.warning("could not mark interrupted flow runs Crashed: %s", exc)


def mlflow_credentials(auth: bool) -> dict[str, str]:
    """The worker's MLflow login when the server has basic auth: yours if set, else the admin's.

    They reach flow runs through the worker's environment, never through job variables, so the
    Prefect database holds no password."""
    if not auth:
        return {}
    username = os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    return {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}


# --------------------------------------------------------------------------- start / stop / status


def read_stack(home: Path) -> Stack | None:
    try:
        return Stack.from_dict(json.loads((Path(home) / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_stack(stack: Stack) -> None:
    path = Path(stack.home) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stack.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def start(
    home: Path = DEFAULT_HOME,
    *,
    prefect_port: int | None = None,
    mlflow_port: int | None = None,
    mlflow_auth: bool = False,
    ui: bool = True,
    scheduler: bool = True,
    worker_env: Mapping[str, str] | None = None,
    prefect_file: Path = PREFECT_FILE,
    timeout: float = 180.0,
    alert_webhook: str | None = None,
) -> Stack:
    """Bring the whole stack up (see the module docstring); on failure stop what was started."""
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    previous = read_stack(home)
    if previous is not None and any(is_ours(proc) for proc in previous.processes.values()):
        raise ServeError(f"a stack from {home} is already running ({previous.prefect_url}); stop it first")

    began = time.monotonic()
    timings: dict[str, float] = {}
    prefect_port = choose_port(prefect_port, DEFAULT_PREFECT_PORT, "Prefect server")
    mlflow_port = choose_port(mlflow_port, DEFAULT_MLFLOW_PORT, "MLflow server")
    stack = Stack(
        home=str(home),
        prefect_url=f"http://{HOST}:{prefect_port}",
        mlflow_url="",
        work_pool=WORK_POOL,
        deployments=[],
        mlflow_home=str(home / "mlflow"),
        mlflow_auth=mlflow_auth,
        ui=ui,
        started_at=_now(),
    )
    try:
        stack.processes["prefect-server"] = start_prefect_server(home, prefect_port, ui=ui, scheduler=scheduler)
        write_stack(stack)
        try:
            info = start_server(home / "mlflow", host=HOST, port=mlflow_port, auth=mlflow_auth, timeout=timeout)
        except ServerError as exc:
            raise ServeError(str(exc)) from None
        stack.mlflow_url = info.url
        timings["mlflow_server"] = round(time.monotonic() - began, 1)
        wait_healthy(f"{stack.api_url}/health", stack.processes["prefect-server"], "Prefect server", timeout)
        timings["prefect_server"] = round(time.monotonic() - began, 1)
        write_stack(stack)

        ensure_work_pool(stack.api_url)
        _crash_interrupted_runs(stack.api_url)  # left Running by a stack that died without `stop`
        since = datetime.now(timezone.utc)
        stack.processes["worker"] = start_worker(home, worker_environment(stack, worker_env))  # boots while we deploy
        write_stack(stack)
        stack.deployments = deploy(home, stack.api_url, prefect_file, timeout=timeout)
        timings["deploy"] = round(time.monotonic() - began, 1)
        wait_worker_online(stack.api_url, stack.processes["worker"], since, timeout)
        timings["worker"] = round(time.monotonic() - began, 1)
        if alert_webhook:
            from ppoflow.flows import alerts

            stack.alerts = alerts.install(stack.api_url, alert_webhook)
    except BaseException:
        log.error("start failed; stopping what was started")
        stop(home)
        raise
    stack.startup_seconds = timings
    write_stack(stack)
    log.info("stack up in %.1f s: Prefect %s, MLflow %s", time.monotonic() - began, stack.prefect_url, stack.mlflow_url)
    return stack


def stop(home: Path = DEFAULT_HOME, *, timeout: float = 30.0) -> list[str]:
    """Stop what `start` started in HOME (worker, Prefect server, MLflow server); names what was stopped."""
    home = Path(home).expanduser().resolve()
    stack = read_stack(home)
    stopped: list[str] = []
    if stack is not None:
        workers = {name: proc for name, proc in stack.processes.items() if name != "prefect-server"}
        server = stack.processes.get("prefect-server")
        for name, proc in [*workers.items(), ("prefect-server", server)]:
            if proc is None:
                continue
            if name == "prefect-server" and stopped and is_ours(proc):
                _crash_interrupted_runs(stack.api_url)  # the workers took their flow runs with them
            if is_ours(proc):
                log.info("stopping %s (pid %d)", name, proc.pid)
                processes.terminate_group(proc.pid, timeout)
                stopped.append(name)
            elif processes.alive(proc.pid):
                log.warning("pid %d is no longer our %s; left alone", proc.pid, name)
    try:
        if stop_server(home / "mlflow", timeout=timeout):
            stopped.append("mlflow-server")
    except ServerError as exc:
        raise ServeError(str(exc)) from None
    if stack is not None:
        stack.processes = {}
        write_stack(stack)
    return stopped


def status(home: Path = DEFAULT_HOME) -> tuple[Stack | None, dict[str, bool]]:
    """The recorded stack and, per component, whether it is up."""
    stack = read_stack(Path(home).expanduser().resolve())
    if stack is None:
        return None, {}
    up = {name: is_ours(proc) for name, proc in stack.processes.items()}
    up["prefect-api"] = processes.http_status(f"{stack.api_url}/health") == 200
    up["mlflow-server"] = bool(stack.mlflow_url) and processes.http_status(f"{stack.mlflow_url}/health") == 200
    return stack, up


# --------------------------------------------------------------------------- CLI


def _shown(path: str | Path) -> str:
    """A path relative to the current directory when it lies below it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def describe(stack: Stack) -> str:
    prefect_cli = _shown(Path(sys.executable).parent / "prefect")
    worker = stack.processes.get("worker")
    schedules = []
    for deployment in stack.deployments:
        active = [f"{s['cron']} {s['timezone']}" for s in deployment["schedules"] if s.get("active", True)]
        schedules.append(f"{deployment['name']} ({', '.join(active) if active else 'no active schedule'})")
    total = max(stack.startup_seconds.values(), default=0.0)
    return "\n".join(
        [
            f"ppoflow stack up in {total:.0f} s (state and logs in {_shown(stack.home)}/)",
            f"  Prefect UI    {stack.prefect_url if stack.ui else '(none: --no-ui)'}    (API {stack.api_url})",
            f"  MLflow UI     {stack.mlflow_url}{'    (basic auth)' if stack.mlflow_auth else ''}",
            f"  work pool     {stack.work_pool} (process, concurrency limit {POOL_CONCURRENCY_LIMIT})"
            + (f", worker pid {worker.pid}" if worker else ""),
            f"  deployments   {'; '.join(schedules)}",
            f"  alerts        {', '.join(stack.alerts) if stack.alerts else 'none (make serve ALERT_WEBHOOK=URL)'}",
            "",
            "Trigger a run (from another shell, in this directory):",
            f"  export PREFECT_API_URL={stack.api_url} MLFLOW_TRACKING_URI={stack.mlflow_url}",
            f"  {prefect_cli} deployment run rlhf-ppo/toy-nightly --watch \\",
            '      --param overrides=\'["ppo.total_episodes=256", "output_dir=runs/toy-256/{flow_run}"]\'',
            "Stop everything: make serve-stop",
        ]
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ppoflow.deployments.serve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("start", "start the stack and wait until every part is up"),
        ("stop", "stop what start started"),
        ("status", "show the stack and what is up"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument(
            "--home", type=Path, default=DEFAULT_HOME, help=f"state and logs (default ./{DEFAULT_HOME})"
        )
    start_command = commands.choices["start"]
    start_command.add_argument(
        "--prefect-port",
        type=int,
        default=None,
        help=f"default {DEFAULT_PREFECT_PORT}, or any free port if taken; 0 = any free port",
    )
    start_command.add_argument(
        "--mlflow-port",
        type=int,
        default=None,
        help=f"default {DEFAULT_MLFLOW_PORT}, or any free port if taken; 0 = any free port",
    )
    start_command.add_argument(
        "--mlflow-auth",
        action="store_true",
        help="MLflow basic auth (needs MLFLOW_AUTH_ADMIN_PASSWORD and MLFLOW_FLASK_SERVER_SECRET_KEY)",
    )
    start_command.add_argument("--no-ui", dest="ui", action="store_false", help="Prefect API without its UI")
    start_command.add_argument("--timeout", type=float, default=180.0, help="seconds each step may take (default 180)")
    start_command.add_argument(
        "--alert-webhook",
        default=os.environ.get("PPOFLOW_ALERT_WEBHOOK") or None,
        metavar="URL",
        help="POST a message here when a night fails or crashes and when a candidate is rejected "
        "(default: $PPOFLOW_ALERT_WEBHOOK; none: no alerts)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API request otherwise
    try:
        if args.command == "start":
            stack = start(
                args.home,
                prefect_port=args.prefect_port,
                mlflow_port=args.mlflow_port,
                mlflow_auth=args.mlflow_auth,
                ui=args.ui,
                timeout=args.timeout,
                alert_webhook=args.alert_webhook,
            )
            print(describe(stack))
            return 0
        if args.command == "stop":
            stopped = stop(args.home)
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
            return 0
        stack, up = status(args.home)
        if stack is None:
            print(f"no stack recorded in {args.home}")
            return 3
        print(describe(stack))
        print("up: " + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in up.items()))
        return 0 if up and all(up.values()) else 1
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
