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
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: make gpu-check runs the real checks here")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    proc = run_check(tmp_path / "gpu.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["cuda"] is False and "no CUDA device" in result["note"] and "checks" not in result


@pytest.mark.slow
@pytest.mark.distributed
def test_the_cpu_smoke_mode_runs_every_check(toy_world, tmp_path):
    # throughput needs the TRL venv (make bench-venv), which the test suite does not build
    proc = run_check(tmp_path / "gpu.json", "--device", "cpu", "--toy", str(toy_world), "--skip", "throughput")
    result = json.loads((tmp_path / "gpu.json").read_text())
    checks = result["checks"]
    assert proc.returncode == 0, (result.get("failed"), {k: v.get("error") for k, v in checks.items()}, proc.stderr[-3000:])
    assert {name: check["status"] for name, check in checks.items()} == {
        "one_update": "pass", "packing": "pass", "kill_resume": "pass", "two_processes": "pass", "throughput": "skipped",
        "throughput_smollm2_shape": "skipped"}
    update = checks["one_update"]
    assert update["compute"]["compute_dtype"] == "bfloat16" and update["compute"]["trained_weight_dtypes"] == ["float32"]
    assert 0.5 < update["change_ratio_compute_vs_fp32"] < 2.0
    assert update["float32"]["logprobs_from_generation"] and update["float32"]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert checks["packing"]["sdpa"]["self_check_packs"] and checks["packing"]["packed_rows"] < checks["packing"]["padded_rows"]
    resume = checks["kill_resume"]
    assert resume["bitwise_equal"] and resume["killed"]["killed_after_step_2"]
    assert resume["killed"]["sha256"] == resume["uninterrupted"]["sha256"]
    two = checks["two_processes"]
    assert two["backend"] == "gloo" and two["fsdp_vs_ddp_max_abs_weight_difference"] <= 1e-5
    assert two["zero3"]["exit"] == 0 and two["zero3_vs_ddp_max_abs_weight_difference"] <= 1e-5  # the suite installs the deepspeed extra
