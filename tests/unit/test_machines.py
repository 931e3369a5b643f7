"""The launch ticket between the main machine and `ppoflow join` on the others (ppoflow.machines)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ppoflow.machines import JoinError, Machines, join, launch_command, new_ticket, read_ticket, write_ticket

REPO = Path(__file__).resolve().parents[2]


def ticket(tmp_path: Path, machines: Machines, **changes):
    made = new_ticket(
        "train",
        tmp_path / "launch/train.inputs.json",
        tmp_path / "launch/train.result.json",
        "run-1",
        num_processes=4,
        machines=machines,
        port=29555,
        accelerate_config=None,
    )
    return made.model_copy(update=changes)


def test_each_machine_launches_its_share_of_the_same_rendezvous(tmp_path):
    two = ticket(tmp_path, Machines(num_machines=2, main_process_ip="10.0.0.1"))
    main, other = launch_command(two, 0, 100), launch_command(two, 1, 200, tmp_path / "mine.yaml")
    for command, rank in ((main, 0), (other, 1)):
        text = " ".join(command)
        assert "--num_processes 4 --num_machines 2" in text  # processes in all: accelerate gives each machine 4 / 2
        assert f"--main_process_port 29555 --machine_rank {rank} --main_process_ip 10.0.0.1 --same_network" in text
        assert text.endswith(f"--parent-pid {100 if rank == 0 else 200} --mlflow-run-id run-1")
    assert "--config_file" not in main and other[other.index("--config_file") + 1] == str(tmp_path / "mine.yaml")
    alone = " ".join(launch_command(ticket(tmp_path, Machines()), 0, 100))
    assert "--num_machines 1" in alone and "--machine_rank" not in alone and "--main_process_ip" not in alone


def test_the_ticket_is_written_whole_and_read_back(tmp_path):
    assert read_ticket(tmp_path) is None
    made = ticket(tmp_path, Machines(num_machines=2, main_process_ip="10.0.0.1"))
    write_ticket(tmp_path, made)
    assert read_ticket(tmp_path) == made
    write_ticket(tmp_path, made.model_copy(update={"state": "ended", "returncode": 1}))
    assert read_ticket(tmp_path).state == "ended" and read_ticket(tmp_path).returncode == 1


def test_a_joiner_refuses_the_main_machines_rank_and_a_rank_the_launch_has_not(tmp_path):
    with pytest.raises(JoinError, match="machine 0 is the main machine"):
        join(tmp_path, 0, idle_timeout=0)
    write_ticket(tmp_path, ticket(tmp_path, Machines(num_machines=2, main_process_ip="127.0.0.1")))
    with pytest.raises(JoinError, match="--machine-rank 2: the launch spans 2 machines"):
        join(tmp_path, 2, idle_timeout=0)
    write_ticket(tmp_path, ticket(tmp_path, Machines()))
    with pytest.raises(JoinError, match="is on one machine .* nothing to join"):
        join(tmp_path, 1, idle_timeout=0)


def test_a_joiner_does_not_join_an_ended_launch_and_gives_up_after_its_idle_timeout(tmp_path):
    write_ticket(
        tmp_path, ticket(tmp_path, Machines(num_machines=2, main_process_ip="127.0.0.1"), state="ended", returncode=0)
    )
    joined = subprocess.run(
        [
            sys.executable,
            "-m",
            "ppoflow.cli",
            "join",
            "--output-dir",
            str(tmp_path),
            "--machine-rank",
            "1",
            "--idle-timeout",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert joined.returncode == 2  # a user error, in one line
    errors = [line for line in joined.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no launch to join in" in errors[0] and "--idle-timeout" in errors[0]
