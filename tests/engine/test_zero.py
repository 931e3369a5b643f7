"""DeepSpeed ZeRO training (an accelerate config with distributed_type DEEPSPEED) of 2 CPU
processes (gloo, DeepSpeed's CPU accelerator): the runs of tests/engine/launching.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.conftest import toy_config
from tests.engine.launching import FINAL_STEP, TRAINING, kill_all, run, sha256, start, train
from tests.reliability.helpers import (
    checkpoint_steps,
    comparable,
    error_lines,
    policy_tensors,
    read_metrics,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# Measured against DDP on this config: ZeRO-2 4e-8 after three updates (its reduce-scatter sums in
# another order); ZeRO-3 1.8e-6 in 18 of the policy's 919 488 weights after one update, and no more
# after three: weights whose gradient is near AdamW's eps, where the first step's size (up to lr =
# 5e-5) follows the gradient's last bits (1.28e-5 against 1.10e-5 for the largest). The bound is 20 %
# of one step, and only a few weights may come near it; a missed gradient reduction or a wrong
# accumulation moves most weights by the order of the step itself.
TOLERANCE = 1e-5
NEAR = 1e-7


def accelerate_config(directory: Path, stage: int) -> Path:
    """As `accelerate config` writes it for DeepSpeed on one machine."""
    path = directory / f"accelerate-zero{stage}.yaml"
    path.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
        "  gradient_accumulation_steps: 2\n  offload_optimizer_device: none\n  offload_param_device: none\n"
        f"  zero3_init_flag: false\n  zero_stage: {stage}\n"
        "machine_rank: 0\nmixed_precision: 'no'\nnum_machines: 1\nnum_processes: 2\n"
    )
    return path


@pytest.fixture(scope="module")
def runs(toy_world, tmp_path_factory, unsharded_run) -> dict[str, Path]:
    """Uninterrupted runs: DDP, ZeRO-2 and ZeRO-3."""
    directory = tmp_path_factory.mktemp("zero")
    return {
        "ddp": unsharded_run,
        "zero2": run(toy_world, directory, "zero2", f"runtime.accelerate_config={accelerate_config(directory, 2)}"),
        # with the periodic evaluation (main process; ZeRO-3's parameters gathered for it), which changes no weight
        "zero3": run(
            toy_world,
            directory,
            "zero3",
            f"runtime.accelerate_config={accelerate_config(directory, 3)}",
            "ppo.eval_every=2",
        ),
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_training_matches_ddp_and_saves_plain_hugging_face_models(runs, stage):
    zero, ddp = runs[f"zero{stage}"], runs["ddp"]
    for step in (1, FINAL_STEP):
        for model in ("policy", "value"):
            ours, plain = (policy_tensors(run / f"checkpoints/step-{step:06d}/{model}") for run in (zero, ddp))
            assert ours.keys() == plain.keys()  # the models' own names, the tied LM head once
            differences = [(ours[key] - plain[key]).abs() for key in plain]
            assert max(d.max().item() for d in differences) <= TOLERANCE, (step, model)
            assert sum(int((d > NEAR).sum()) for d in differences) <= 100, (step, model)
    start = policy_tensors(ddp / "checkpoints/step-000000/policy")
    moved = policy_tensors(zero / "checkpoints/step-000001/policy")
    # one step is far above it
    assert sum(int(((moved[key] - start[key]).abs() > TOLERANCE).sum()) for key in start) > 100_000
    assert (zero / "eval.json").is_file() and (zero / "final" / "model.safetensors").is_file()
    if stage == 3:
        assert [row["update"] for row in read_metrics(zero) if "eval/win_rate" in row] == [2, 3]


def test_a_zero3_run_killed_after_its_second_checkpoint_resumes_bitwise(runs, toy_world, tmp_path):
    output_dir, child, log = train(
        toy_world, tmp_path, "killed", f"runtime.accelerate_config={accelerate_config(tmp_path, 3)}", "ppo.eval_every=2"
    )
    assert wait_for(lambda: 2 in checkpoint_steps(output_dir), 300, alive=lambda: child.poll() is None), (
        log.read_text()[-4000:]
    )
    kill_all(child)
    assert FINAL_STEP not in checkpoint_steps(output_dir), "the run finished before the kill: nothing was resumed"

    # Resuming without DeepSpeed is refused in one line (the optimizer state is ZeRO's partitions).
    other = write_config(toy_config(toy_world, output_dir, *TRAINING, "ppo.eval_every=2"), tmp_path / "plain.yaml")
    refused = start(other, tmp_path / "refused.log")
    assert refused.wait(timeout=600) != 0
    lines = set(error_lines((tmp_path / "refused.log").read_text()))
    assert len(lines) == 1 and "written with DeepSpeed ZeRO-3 and this run has no DeepSpeed" in lines.pop()

    resumed = start(tmp_path / "killed.yaml", log)
    assert resumed.wait(timeout=600) == 0, log.read_text()[-4000:]
    for model in ("policy", "value"):
        step = f"checkpoints/step-{FINAL_STEP:06d}/{model}"
        assert sha256(output_dir / step) == sha256(runs["zero3"] / step)
    assert sha256(output_dir / "final") == sha256(runs["zero3"] / "final")
    assert comparable(read_metrics(output_dir)) == comparable(read_metrics(runs["zero3"]))
