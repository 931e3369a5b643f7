"""Two-process `ppoflow train` runs under `accelerate launch` (gloo on this CPU) for the sharding
tests (test_fsdp.py, test_zero.py): three updates of 16 prompts (2 × 8), each mini-batch
accumulated over two micro-batches of 4 (so the skipped gradient sync between them is exercised), a
checkpoint after every update."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

import psutil

from ppoflow.processes import free_port
from tests.engine.conftest import toy_config
from tests.reliability.helpers import REPO, subprocess_env, write_config

TRAINING = (
    "ppo.total_episodes=48",
    "ppo.per_device_train_batch_size=4",
    "ppo.gradient_accumulation_steps=2",
    "ppo.num_mini_batches=1",
    "ppo.checkpoint_every=1",
    "ppo.keep_checkpoints=10",
    "runtime.num_processes=2",
)
FINAL_STEP = 3


def start(config_path: Path, log: Path) -> subprocess.Popen:
    """`ppoflow train` under `accelerate launch` with 2 processes, in its own session."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "--main_process_port",
                str(free_port()),
                "-m",
                "ppoflow.cli",
                "train",
                "--config",
                str(config_path),
            ],
            cwd=REPO,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_all(child: subprocess.Popen) -> None:
    """SIGKILL the launcher and its training processes (torch's launcher starts each in a session of its own)."""
    launcher = psutil.Process(child.pid)
    for process in [launcher, *launcher.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    child.wait(timeout=60)


def train(toy: Path, directory: Path, name: str, *overrides: str) -> tuple[Path, subprocess.Popen, Path]:
    output_dir = directory / name
    config_path = write_config(toy_config(toy, output_dir, *TRAINING, *overrides), directory / f"{name}.yaml")
    log = directory / f"{name}.log"
    return output_dir, start(config_path, log), log


def run(toy: Path, directory: Path, name: str, *overrides: str) -> Path:
    output_dir, child, log = train(toy, directory, name, *overrides)
    assert child.wait(timeout=600) == 0, log.read_text()[-4000:]
    return output_dir


def sha256(model_dir: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(model_dir.glob("*.safetensors"))
    }
