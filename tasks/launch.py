"""Stages 4 and 5 on several processes: `accelerate launch` as a child process group of the task.

With `runtime.num_processes > 1` the task hands its input manifests to `ppoflow.cli stage` through
a JSON file in the workspace and starts `accelerate launch --num_processes N` on it: the same
engine, code path and numbers as a user's own `accelerate launch -m ppoflow.cli train`. The task
streams every rank's log into its own (ranks prefix their lines), follows `metrics.jsonl` for its
progress callback, and reads the result manifest the main rank wrote. MLflow metrics come from the
main rank itself, through the run's metrics sink and spool.

Faults: a rank that dies ends the group (torch's elastic agent stops the others) and the task fails
naming the exit status, so its retry resumes from the newest intact checkpoint; an exception in the
task (a cancelled flow run included) ends the group, SIGTERM then SIGKILL; and each rank ends itself
when the flow process is gone (`--parent-pid`), so nothing is left holding a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from ppoflow.layout import METRICS_FILE
from ppoflow.manifests import RunPlan
from ppoflow.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
GRACE_SECONDS = 15.0


class LaunchFailed(RuntimeError):
    """The launched group failed; a transient failure, so the task retries (and resumes)."""


def needs_launch(plan: RunPlan) -> bool:
    """Whether the plan is for more processes than this one (runtime.num_processes > 1)."""
    from ppoflow.runtime import process_state

    return plan.batch.world_size > process_state().num_processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(
    stage: str, num_processes: int, inputs: Path, result: Path, mlflow_run_id: str | None, accelerate_config: Path | None = None,
) -> list[str]:
    # --multi_gpu on a CPU too: the engine joins the processes with gloo there (runtime.process_state).
    # The user's accelerate config (runtime.accelerate_config: gpu_ids, rendezvous settings) comes
    # first; the options after it override what ppoflow must decide itself.
    config_file = ["--config_file", str(Path(accelerate_config).expanduser())] if accelerate_config is not None else []
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *config_file,
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "ppoflow.cli", "stage", stage, "--inputs", str(inputs), "--result", str(result), "--parent-pid", str(os.getpid()),
    ]
    if mlflow_run_id:
        command += ["--mlflow-run-id", mlflow_run_id]
    return command


def run_launched(
    stage: str, plan: RunPlan, inputs: dict[str, BaseModel], result_type: type[M], *,
    mlflow_run_id: str | None = None, on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> M:
    """Run engine stage `stage` on `plan.batch.world_size` processes and return its result manifest."""
    work = plan.output_dir / "launch"
    work.mkdir(parents=True, exist_ok=True)
    inputs_path, result_path = work / f"{stage}.inputs.json", work / f"{stage}.result.json"
    inputs_path.write_text(json.dumps({name: manifest.model_dump(mode="json") for name, manifest in inputs.items()}))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update({"MLFLOW_TRACKING_URI": resolve_tracking_uri(), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    command = launch_command(stage, plan.batch.world_size, inputs_path, result_path, mlflow_run_id, plan.config.runtime.accelerate_config)
    task_logger().info("%s on %d processes: %s", stage, plan.batch.world_size, " ".join(command))  # in the UI too
    metrics_path = plan.output_dir / METRICS_FILE
    follower = MetricsFollower(metrics_path, on_metrics) if on_metrics else None
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: deque[str] = deque(maxlen=40)
    reader = threading.Thread(target=_relay, args=(child, tail, task_logger()), name=f"{stage}-logs", daemon=True)
    reader.start()
    try:
        while child.poll() is None:
            time.sleep(0.5)
            if follower:
                follower.poll()
    except BaseException:
        end_group(child)
        raise
    finally:
        reader.join(timeout=5)
        if follower:
            follower.poll()
    if child.returncode != 0 or not result_path.is_file():
        failure = next((line for line in reversed(tail) if "exitcode" in line or "Error" in line), tail[-1] if tail else "")
        raise LaunchFailed(f"{stage} on {plan.batch.world_size} processes failed: accelerate launch exited {child.returncode}: {failure.strip()}")
    return result_type.model_validate_json(result_path.read_text())


def task_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect task run's logger (its lines reach the UI), or this module's outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _relay(child: subprocess.Popen, tail: deque[str], logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Every line the ranks print, into the task's log (ranks prefix their own lines)."""
    assert child.stdout is not None
    for line in child.stdout:
        line = line.rstrip()
        if line:
            tail.append(line)
            logger.info("%s", line)


def end_group(child: subprocess.Popen) -> None:
    """SIGTERM the launched process group, SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class MetricsFollower:
    """Hands each update's line of `metrics.jsonl` (written by the main rank) to a callback, once:
    lines of updates already seen (or left by an attempt before the resumed checkpoint) are skipped."""

    def __init__(self, path: Path, callback: Callable[[dict[str, Any]], None]):
        self.path, self.callback = path, callback
        self.last_update = 0

    def poll(self) -> None:
        try:
            lines = self.path.read_text().split("\n")[:-1]  # the last piece may be a line being written
        except FileNotFoundError:
            return
        for line in lines:
            if line.strip():
                metrics = json.loads(line)
                if metrics["update"] > self.last_update:
                    self.last_update = metrics["update"]
                    self.callback(metrics)
