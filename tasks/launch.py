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
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from ppoflow import processes
from ppoflow.machines import Machines, Ticket, end_group, launch_command, new_ticket, write_ticket
from ppoflow.manifests import RunPlan
from ppoflow.runtime import launchable_accelerate_config, read_accelerate_config
from ppoflow.tracking import resolve_tracking_uri
from ppoflow.workspace import METRICS_FILE

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class LaunchFailed(RuntimeError):
    """The launched group failed; a transient failure, so the task retries (and resumes)."""


def needs_launch(plan: RunPlan) -> bool:
    """Whether the plan is for more processes than this one (runtime.num_processes > 1)."""
    from ppoflow.runtime import process_state

    return plan.batch.world_size > process_state().num_processes


def plan_launch(stage: str, plan: RunPlan, inputs: Path, result: Path, mlflow_run_id: str | None) -> Ticket:
    """The launch of `stage`: on this machine, or on the machines `runtime.accelerate_config` names
    (the port of their rendezvous: the file's `main_process_port`, else a free one)."""
    runtime = plan.config.runtime
    settings = read_accelerate_config(runtime)
    machines = Machines.from_settings(settings)
    port = (
        int(settings["main_process_port"])
        if machines.num_machines > 1 and settings.get("main_process_port")
        else processes.free_port()
    )
    accelerate_config = None
    # as given, or its copy without accelerate's FSDP mode (ppoflow shards itself)
    if runtime.accelerate_config is not None:
        accelerate_config = launchable_accelerate_config(runtime.accelerate_config, inputs.parent / "accelerate.yaml")
    return new_ticket(
        stage,
        inputs,
        result,
        mlflow_run_id,
        num_processes=plan.batch.world_size,
        machines=machines,
        port=port,
        accelerate_config=accelerate_config,
    )


def run_launched(
    stage: str,
    plan: RunPlan,
    inputs: dict[str, BaseModel],
    result_type: type[M],
    *,
    mlflow_run_id: str | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> M:
    """Run engine stage `stage` on `plan.batch.world_size` processes and return its result manifest."""
    work = plan.output_dir / "launch"
    work.mkdir(parents=True, exist_ok=True)
    inputs_path, result_path = work / f"{stage}.inputs.json", work / f"{stage}.result.json"
    inputs_path.write_text(json.dumps({name: manifest.model_dump(mode="json") for name, manifest in inputs.items()}))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update({"MLFLOW_TRACKING_URI": resolve_tracking_uri(), "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    ticket = plan_launch(stage, plan, inputs_path, result_path, mlflow_run_id)
    command = launch_command(ticket, 0, os.getpid())
    machines = ticket.machines.num_machines
    where = (
        f" over {machines} machines (the others join with `ppoflow join --output-dir {plan.output_dir}`)"
        if machines > 1
        else ""
    )
    # in the UI too
    task_logger().info("%s on %d processes%s: %s", stage, plan.batch.world_size, where, " ".join(command))
    metrics_path = plan.output_dir / METRICS_FILE
    follower = MetricsFollower(metrics_path, on_metrics) if on_metrics else None
    write_ticket(plan.output_dir, ticket)  # the other machines' cue, before the main machine waits for them
    child = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
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
        write_ticket(plan.output_dir, ticket.model_copy(update={"state": "ended", "returncode": child.poll()}))
    if child.returncode != 0 or not result_path.is_file():
        failure = next(
            (line for line in reversed(tail) if "exitcode" in line or "Error" in line), tail[-1] if tail else ""
        )
        raise LaunchFailed(
            f"{stage} on {plan.batch.world_size} processes failed: "
            f"accelerate launch exited {child.returncode}: {failure.strip()}"
        )
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
