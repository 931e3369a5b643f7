"""What the reliability tests share: the training config, comparisons, file-system watching, mounts."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ppoflow.config import RunConfig
from tests.engine.conftest import toy_config

REPO = Path(__file__).resolve().parents[2]

# Eight PPO updates of 16 prompts (2 mini-batches of 8), a checkpoint after every update, two kept:
# about 5 s of training on 2 quiet cores, long enough to land kills in every phase of a run.
TRAINING = (
    "ppo.total_episodes=128",
    "ppo.per_device_train_batch_size=8",
    "ppo.gradient_accumulation_steps=2",
    "ppo.num_mini_batches=2",
    "ppo.checkpoint_every=1",
    "ppo.keep_checkpoints=2",
)
NUM_UPDATES = 8
# Flow runs log to MLflow but need no model registry entry unless a test asks for one.
FLOW_SETTINGS = (
    "tracking.experiment=reliability",
    "tracking.registered_model_name=reliability-policy",
    "tracking.system_metrics=false",
    "flow.retries=1",
    "flow.retry_delay_seconds=[1.0]",
)
NOT_COMPARED = ("timing/", "perf/")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of every process a reliability test starts: offline, one thread, no servers
    inherited (each test names its own MLflow store and Prefect home)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")
    }
    env |= {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    return env | extra


def reliability_config(toy: Path, output_dir: Path, *overrides: str) -> RunConfig:
    return toy_config(toy, output_dir, *TRAINING, *overrides)


def write_config(config: RunConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------
# Comparing runs


def policy_tensors(policy_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(policy_dir).glob("*.safetensors")):
        tensors |= load_file(file)
    assert tensors, f"no safetensors in {policy_dir}"
    return tensors


def assert_bitwise_equal(expected_dir: Path, actual_dir: Path) -> int:
    """torch.equal on every tensor of two saved policies; returns the number of tensors compared."""
    expected, actual = policy_tensors(expected_dir), policy_tensors(actual_dir)
    assert expected.keys() == actual.keys()
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, f"{len(differing)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"
    return len(expected)


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def comparable(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics without wall-clock timings: equal, value for value, between identical runs."""
    return [{key: value for key, value in row.items() if not key.startswith(NOT_COMPARED)} for row in metrics]


def assert_same_run(reference: dict[str, Any], output_dir: Path) -> None:
    """Nothing lost, nothing repeated: the final policy bit for bit, every update's metrics once and
    equal, and the same evaluation as the uninterrupted run."""
    assert_bitwise_equal(reference["output_dir"] / "final", output_dir / "final")
    metrics = read_metrics(output_dir)
    assert [row["update"] for row in metrics] == list(range(1, NUM_UPDATES + 1))
    assert comparable(metrics) == comparable(reference["metrics"])
    evaluation = json.loads((output_dir / "eval.json").read_text())
    evaluation.pop("promotion", None)  # the flow's promotion gate adds its decision; `ppoflow train` has none
    assert evaluation == reference["eval"]


def error_lines(log_text: str) -> list[str]:
    """The CLI's user-error lines (`error: ...`)."""
    return [line for line in log_text.splitlines() if line.startswith("error: ")]


def summary_of(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Watching a run's files


def checkpoint_steps(output_dir: Path) -> list[int]:
    root = Path(output_dir) / "checkpoints"
    try:
        return sorted(int(entry.name[5:]) for entry in os.scandir(root) if entry.name.startswith("step-"))
    except FileNotFoundError:
        return []


def partial_checkpoints(output_dir: Path) -> list[str]:
    try:
        return [
            entry.name for entry in os.scandir(Path(output_dir) / "checkpoints") if entry.name.startswith(".partial-")
        ]
    except FileNotFoundError:
        return []


def snapshot(output_dir: Path) -> dict[str, Any]:
    """Where a run stood: complete and partial checkpoints, metrics lines, eval and final policy."""
    output_dir = Path(output_dir)
    return {
        "steps": checkpoint_steps(output_dir),
        "partial": partial_checkpoints(output_dir),
        "metrics_lines": len(read_metrics(output_dir)) if (output_dir / "metrics.jsonl").exists() else 0,
        "eval_json": (output_dir / "eval.json").exists(),
        "partial_final": (output_dir / ".partial-final").exists(),
        "final": (output_dir / "final").exists(),
    }


def wait_for(
    condition: Callable[[], Any], timeout: float, interval: float = 0.002, alive: Callable[[], bool] | None = None
) -> Any:
    """Poll until `condition()` is truthy (returned); None when `alive()` turns false or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if alive is not None and not alive():
            return condition() or None
        time.sleep(interval)
    return None


# ------------------------------------------------------------------------------------------------
# Processes started in their own session (a flow run and its ephemeral Prefect server)


def start_cli(argv: list[str], log: Path, env: dict[str, str], stdout: Path | None = None) -> subprocess.Popen:
    with open(log, "ab") as err, open(stdout or log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ppoflow.flows.cli", *argv],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its session), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


# ------------------------------------------------------------------------------------------------
# Real file systems: a small tmpfs (a disk that fills up) and a read-only bind mount


def _mount(*args: str) -> None:
    deadline = time.monotonic() + 60  # a checkpoint being written holds a remount off; on a loaded machine, seconds
    while True:
        result = subprocess.run(["mount", *args], capture_output=True, text=True)
        if result.returncode == 0:
            return
        if "busy" not in result.stderr.lower() or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a write in flight: remounting read-only waits for it
    raise OSError(errno.EPERM, f"mount {' '.join(args)}: {result.stderr.strip()}")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def require_mounts(tmp_path: Path) -> None:
    """Skip (saying why) where this process may not mount file systems."""
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe))
    except OSError as exc:
        pytest.skip(
            f"cannot mount a tmpfs here ({exc.strerror}): the disk-full and read-only faults need root/CAP_SYS_ADMIN"
        )
    _umount(probe)
    probe.rmdir()


@contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


def resize_tmpfs(path: Path, size_bytes: int) -> None:
    _mount("-o", f"remount,size={size_bytes}", str(path))


@contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[Path]:
    source.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(source), str(target))
    try:
        yield target
    finally:
        _umount(target)


def set_read_only(target: Path, read_only: bool) -> None:
    _mount("-o", f"remount,bind,{'ro' if read_only else 'rw'}", str(target))
