"""Launching stages 4 and 5 on several processes, on one machine or several.

One machine: the flow's task starts `accelerate launch --multi_gpu --num_processes N -m ppoflow.cli
stage ...` (`ppoflow.tasks.launch`), a child process group.

Several machines (`runtime.accelerate_config` with `num_machines` > 1 and `main_process_ip`): the
flow runs on the main machine (machine_rank 0) and launches its share of the processes there; each
other machine runs `ppoflow join --output-dir OUTPUT --machine-rank R`, which starts that machine's
share of every launch. They meet through a ticket, `OUTPUT/launch/ticket.json` (`output_dir` on
storage every machine sees): before each launch the main machine writes the stage, the paths of its
input manifests, the rendezvous address (a free port picked for that launch) and a new id, and after
it the launch's exit status. The joiner serves each new ticket once, ends its share when the main
machine's launch has ended without it, and exits when its share of a training launch succeeded: the
rest of the flow (stage 6) runs on the main machine alone. A retried training task writes a new
ticket, which a joiner still waiting serves: run it until the flow run is over (a job step per
machine on Slurm, a pod per machine on Kubernetes: docs/SCALING.md).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ppoflow import processes
from ppoflow.atomic import write_text_atomic
from ppoflow.errors import PpoflowError
from ppoflow.runtime import launchable_accelerate_config, machine_count

log = logging.getLogger(__name__)

TICKET_FILE = Path("launch") / "ticket.json"
GRACE_SECONDS = 15.0  # after SIGTERM, before SIGKILL
# How long a joiner's share may outlive the main machine's launch that ended well (its last
# collective is behind it; it only has to exit).
FINISH_SECONDS = 60.0


class JoinError(PpoflowError):
    """`ppoflow join` was given what cannot work (a wrong machine rank), or waited in vain."""


class Machines(BaseModel):
    """The machines a launch spans, from `runtime.accelerate_config` (1: this one alone)."""

    model_config = ConfigDict(frozen=True)

    num_machines: int = 1
    main_process_ip: str | None = None
    same_network: bool = True

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Machines:
        return cls(
            num_machines=machine_count(settings),
            main_process_ip=settings.get("main_process_ip"),
            same_network=bool(settings.get("same_network", True)),
        )


class Ticket(BaseModel):
    """One launch of a stage, as the main machine announces it to the others."""

    id: str
    stage: str
    inputs: Path
    result: Path
    mlflow_run_id: str | None
    num_processes: int  # in all, over every machine
    machines: Machines
    main_process_port: int
    accelerate_config: Path | None
    state: Literal["launched", "ended"] = "launched"
    returncode: int | None = None


def new_ticket(
    stage: str,
    inputs: Path,
    result: Path,
    mlflow_run_id: str | None,
    *,
    num_processes: int,
    machines: Machines,
    port: int,
    accelerate_config: Path | None,
) -> Ticket:
    return Ticket(
        id=uuid.uuid4().hex,
        stage=stage,
        inputs=inputs,
        result=result,
        mlflow_run_id=mlflow_run_id,
        num_processes=num_processes,
        machines=machines,
        main_process_port=port,
        accelerate_config=accelerate_config,
    )


def write_ticket(output_dir: Path, ticket: Ticket) -> None:
    path = output_dir / TICKET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, ticket.model_dump_json())


def read_ticket(output_dir: Path) -> Ticket | None:
    try:
        return Ticket.model_validate_json((output_dir / TICKET_FILE).read_text())
    except (FileNotFoundError, ValueError):  # none yet, or one being replaced on a store without atomic rename
        return None


def launch_command(
    ticket: Ticket, machine_rank: int, parent_pid: int, accelerate_config: Path | None = None
) -> list[str]:
    """`accelerate launch` of this machine's share of `ticket`'s processes. The user's accelerate
    config (gpu_ids, rendezvous settings) comes first; the options after it override what ppoflow
    decides itself. `--multi_gpu` on a CPU too: the engine joins the processes with gloo there
    (`runtime.process_state`). `accelerate_config`: this machine's file, instead of the ticket's."""
    config = accelerate_config or ticket.accelerate_config
    config_file = ["--config_file", str(Path(config).expanduser())] if config is not None else []
    machines = ticket.machines
    rendezvous = ["--main_process_port", str(ticket.main_process_port)]
    if machines.num_machines > 1:
        rendezvous += ["--machine_rank", str(machine_rank), "--main_process_ip", str(machines.main_process_ip)]
        if machines.same_network:
            rendezvous.append("--same_network")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *config_file,
        "--multi_gpu",
        "--num_processes",
        str(ticket.num_processes),
        "--num_machines",
        str(machines.num_machines),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *rendezvous,
        "-m",
        "ppoflow.cli",
        "stage",
        ticket.stage,
        "--inputs",
        str(ticket.inputs),
        "--result",
        str(ticket.result),
        "--parent-pid",
        str(parent_pid),
    ]
    if ticket.mlflow_run_id:
        command += ["--mlflow-run-id", ticket.mlflow_run_id]
    return command


def end_group(child: subprocess.Popen) -> None:
    """SIGTERM a launched process group, SIGKILL what is left after a grace period; reap the child."""
    processes.terminate_group(child.pid, GRACE_SECONDS)
    child.wait()


def join(
    output_dir: Path,
    machine_rank: int,
    *,
    accelerate_config: Path | None = None,
    idle_timeout: float | None = None,
    poll_seconds: float = 0.5,
) -> list[dict[str, Any]]:
    """Serve the main machine's launches from this machine (`ppoflow join`) until this machine's
    share of a training launch succeeds; what was served, a dict a launch. Waits `idle_timeout`
    seconds at most for a ticket it has not served (None: no limit)."""
    if machine_rank < 1:
        raise JoinError(
            f"--machine-rank {machine_rank}: machine 0 is the main machine, where the flow launches — "
            "give this machine's rank, 1 to num_machines - 1"
        )
    served: list[dict[str, Any]] = []
    seen: set[str] = set()
    current = read_ticket(output_dir)
    if current is not None and current.state == "ended":
        seen.add(current.id)  # a launch of an earlier attempt: not to be joined
    waited = 0.0
    while True:
        ticket = read_ticket(output_dir)
        if ticket is None or ticket.id in seen or ticket.state != "launched":
            if idle_timeout is not None and waited >= idle_timeout:
                raise JoinError(
                    f"no launch to join in {output_dir / TICKET_FILE} for {idle_timeout:g} s (--idle-timeout) — "
                    "start the flow run on the main machine, with this output_dir"
                )
            time.sleep(poll_seconds)
            waited += poll_seconds
            continue
        seen.add(ticket.id)
        waited = 0.0
        if ticket.machines.num_machines == 1:
            raise JoinError(
                f"the launch in {output_dir / TICKET_FILE} is on one machine (its runtime.accelerate_config has no "
                "num_machines > 1): there is nothing to join — give the flow a config for several machines"
            )
        if ticket.machines.num_machines <= machine_rank:
            raise JoinError(
                f"--machine-rank {machine_rank}: the launch spans {ticket.machines.num_machines} machines — "
                f"give a rank from 1 to {ticket.machines.num_machines - 1}"
            )
        returncode = _serve(output_dir, ticket, machine_rank, accelerate_config, poll_seconds)
        served.append({"stage": ticket.stage, "ticket": ticket.id, "returncode": returncode})
        if ticket.stage == "train" and returncode == 0:
            return served


def _serve(
    output_dir: Path, ticket: Ticket, machine_rank: int, accelerate_config: Path | None, poll_seconds: float
) -> int:
    """This machine's share of one launch; ended when the main machine's launch ended without it."""
    if accelerate_config is not None:  # this machine's own file, without accelerate's FSDP mode (as the flow's)
        accelerate_config = launchable_accelerate_config(
            accelerate_config, ticket.inputs.parent / f"accelerate-machine-{machine_rank}.yaml"
        )
    command = launch_command(ticket, machine_rank, os.getpid(), accelerate_config)
    log.info("machine %d joins %s (%s): %s", machine_rank, ticket.stage, ticket.id, " ".join(command))
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    ended_at: float | None = None
    try:
        while child.poll() is None:
            time.sleep(poll_seconds)
            if child.poll() is not None:
                break
            now = read_ticket(output_dir)
            if now is None:  # being replaced, on a store without atomic rename: read it at the next poll
                continue
            if now.id != ticket.id or now.state == "ended":
                ended_at = ended_at or time.monotonic()
                finished_well = now.id == ticket.id and now.returncode == 0
                if not finished_well or time.monotonic() - ended_at > FINISH_SECONDS:
                    how = f"exit status {now.returncode}" if now.id == ticket.id else "a newer launch replaced it"
                    log.error(
                        "the main machine's %s launch has ended (%s): ending this machine's share", ticket.stage, how
                    )
                    end_group(child)
    except BaseException:
        end_group(child)
        raise
    log.info("machine %d: %s (%s) exited %d", machine_rank, ticket.stage, ticket.id, child.returncode)
    return child.returncode
