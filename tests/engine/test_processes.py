"""What a run's processes must agree on, refused at stage 1 in one line: the number of processes of
the checkpoints it resumes, and no fp16 mixed precision (accelerate's GradScaler would go unused)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ppoflow import pipeline
from ppoflow.errors import ConfigError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def launch(config, tmp_path: Path, *launch_args: str) -> subprocess.CompletedProcess:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *launch_args,
            "--num_machines",
            "1",
            "--dynamo_backend",
            "no",
            "-m",
            "ppoflow.cli",
            "train",
            "--config",
            str(config_path),
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_checkpoints_of_another_number_of_processes_are_refused(run_stages):
    stages = run_stages(
        "ppo.total_episodes=32", "ppo.per_device_train_batch_size=8", "ppo.num_mini_batches=1", train=False
    )
    with pytest.raises(
        ConfigError, match=r"`output_dir`: .* written by 1 process\(es\), and this run has 2 — resume with 1"
    ):
        pipeline.configure(stages.plan.config, world_size=2)
    assert pipeline.configure(stages.plan.config, world_size=1).batch.world_size == 1


@pytest.mark.distributed
def test_two_processes_on_a_one_process_output_dir_fail_in_one_line(run_stages, tmp_path):
    # it used to crash with an IndexError restoring the second process's RNG state
    stages = run_stages(
        "ppo.total_episodes=32", "ppo.per_device_train_batch_size=8", "ppo.num_mini_batches=1", train=False
    )
    result = launch(stages.plan.config, tmp_path, "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no")
    assert result.returncode != 0, result.stderr[-3000:]  # the launcher's own code for a failed process (each exits 2)
    lines = set(error_lines(result.stderr))  # each process says it, in the same words
    assert len(lines) == 1 and "`output_dir`" in lines.pop() and "IndexError" not in result.stderr, result.stderr[
        -3000:
    ]


def test_fp16_mixed_precision_is_refused_before_any_work(make_config, tmp_path):
    config = make_config()
    result = launch(config, tmp_path, "--num_processes", "1", "--mixed_precision", "fp16")
    assert result.returncode != 0, result.stderr[-3000:]  # the launcher's code for a failed process (it exits 2)
    (line,) = set(error_lines(result.stderr))
    assert "--mixed_precision" in line and "fp16 is not supported" in line
    assert not (config.output_dir / "checkpoints").exists()


def test_the_attention_kernel_is_chosen_in_the_config(run_stages):
    trainer = run_stages(
        "models.attn_implementation=eager",
        "ppo.total_episodes=8",
        "ppo.per_device_train_batch_size=8",
        "ppo.num_mini_batches=1",
        train=False,
    ).trainer()
    for model in (trainer.policy, trainer.value, trainer.worker.ref, trainer.worker.reward):
        assert model.config._attn_implementation == "eager"
    assert trainer.worker.packed  # the multi-row self-check passes with eager attention too
    default = run_stages(
        "ppo.total_episodes=8",
        "ppo.per_device_train_batch_size=8",
        "ppo.num_mini_batches=1",
        train=False,
        output_dir=trainer.output_dir.parent / "default",
    ).trainer()
    assert default.policy.config._attn_implementation == "sdpa"


def test_flash_attention_without_a_gpu_is_refused_in_stage_1(make_config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    with pytest.raises(ConfigError, match=r"`models.attn_implementation`: flash_attention_2 needs a CUDA GPU"):
        pipeline.configure(make_config("models.attn_implementation=flash_attention_2"))


@pytest.mark.distributed
def test_a_rank_that_hangs_fails_the_run_after_the_collective_timeout(make_config, tmp_path):
    """Rank 1 stops answering after update 1: rank 0 gives up in its next collective after
    runtime.collective_timeout_seconds, and the launch ends, its hung rank included."""
    from tests.reliability.faulty_rewards import HANG_RANK_ENV

    config = make_config(
        "runtime.num_processes=2",
        "runtime.collective_timeout_seconds=5",
        "ppo.total_episodes=48",
        "ppo.per_device_train_batch_size=8",
        "ppo.num_mini_batches=1",
        "reward_functions=[{path: 'ppoflow.toy:oracle_score', name: oracle, weight: 1.0}, "
        "{path: 'tests.reliability.faulty_rewards:hang_rank_after_update', name: hang, weight: 0.0}]",
    )
    os.environ[HANG_RANK_ENV] = "1:1"
    try:
        began = time.monotonic()
        result = launch(config, tmp_path, "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no")
        took = time.monotonic() - began
    finally:
        del os.environ[HANG_RANK_ENV]
    assert result.returncode != 0, result.stderr[-3000:]
    assert "timed out" in result.stderr.lower(), result.stderr[-3000:]
    metrics = [line for line in (config.output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(metrics) == 1  # update 1 finished; the hang came in update 2's rollout
    assert took < 120, took  # not torch's default of 30 minutes
