"""`make gpu-check` (benchmarks/gpu_check.py) runs its checks end to end in its CPU smoke mode, and
on a machine without CUDA says so and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: make gpu-check runs the real checks here")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    proc = run_check(tmp_path / "gpu.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["cuda"] is False and "no CUDA device" in result["note"] and "checks" not in result


@pytest.mark.slow
@pytest.mark.distributed
def test_the_cpu_smoke_mode_runs_the_two_process_check(toy_world, tmp_path):
    # The other checks run, with the same assertions on their figures, in the device rehearsal
    # (tests/engine/test_device_check.py), which runs this script through benchmarks/device_check.sh.
    skipped = ("one_update", "packing", "kill_resume", "throughput", "throughput_smollm2_shape")
    proc = run_check(
        tmp_path / "gpu.json",
        "--device",
        "cpu",
        "--toy",
        str(toy_world),
        *[arg for name in skipped for arg in ("--skip", name)],
    )
    result = json.loads((tmp_path / "gpu.json").read_text())
    checks = result["checks"]
    assert proc.returncode == 0, (
        result.get("failed"),
        {k: v.get("error") for k, v in checks.items()},
        proc.stderr[-3000:],
    )
    assert {name: check["status"] for name, check in checks.items()} == {
        **dict.fromkeys(skipped, "skipped"),
        "two_processes": "pass",
    }
    two = checks["two_processes"]
    assert two["backend"] == "gloo" and two["fsdp_vs_ddp_max_abs_weight_difference"] <= 1e-5
    # the suite installs the deepspeed extra
    assert two["zero3"]["exit"] == 0 and two["zero3_vs_ddp_max_abs_weight_difference"] <= 1e-5
