"""The CUDA path, on a machine with CUDA only (`gpu` marker; skipped elsewhere with the reason):
every check of the prepared GPU check (`make gpu-check`, benchmarks/gpu_check.py) passes there —
bf16 training, packing per attention kernel, bitwise SIGKILL-resume, and with two GPUs DDP, FSDP
and DeepSpeed ZeRO-3 agreeing. On a CPU machine the same checks run small in
tests/engine/test_gpu_check.py, and the DeepSpeed and FSDP tests run with gloo."""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine.test_gpu_check import run_check

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU: `make gpu-check` (or `pytest -m gpu`) on one"
    ),
]


def test_every_check_of_the_gpu_check_passes_on_this_gpu(toy_world, tmp_path):
    # throughput needs the TRL venv (make bench-venv), which the test suite does not build
    proc = run_check(
        tmp_path / "gpu.json", "--toy", str(toy_world), "--skip", "throughput", "--skip", "throughput_smollm2_shape"
    )
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["cuda"] is True, result
    checks = result["checks"]
    assert proc.returncode == 0, (result.get("failed"), proc.stderr[-3000:])
    expected = {
        "one_update": "pass",
        "packing": "pass",
        "kill_resume": "pass",
        "throughput": "skipped",
        "throughput_smollm2_shape": "skipped",
        "two_processes": "pass" if torch.cuda.device_count() >= 2 else "skipped",
    }
    assert {name: check["status"] for name, check in checks.items()} == expected, checks
    assert checks["one_update"]["compute"]["compute_dtype"] == "bfloat16"
