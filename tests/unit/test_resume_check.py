"""workspace.check_resume: the one check that a checkpoint's state.json continues this run."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppoflow.errors import ConfigError
from ppoflow.workspace import check_resume

WHERE = Path("/runs/nightly")
STATE = {
    "config_hash": "c0ffee",
    "world_size": 2,
    "training_fingerprint": "a" * 64,
    "fsdp": False,
    "zero_stage": 3,
}
SAME = {
    "config_hash": "c0ffee",
    "world_size": 2,
    "training": "a" * 64,
    "sharding": {"fsdp": False, "zero_stage": 3},
}


def test_the_same_run_passes_and_unasked_facts_are_not_checked():
    check_resume(WHERE, STATE, **SAME)
    check_resume(WHERE, STATE, config_hash="c0ffee")  # processes, training and sharding not given
    # A checkpoint older than the fields: one process, unsharded, any training.
    check_resume(WHERE, {"config_hash": "c0ffee"}, config_hash="c0ffee", world_size=1, training="b" * 64)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"config_hash": "beef", "differences": ", differs in ppo.kl_coef: 0.05 -> 0.1"},
            "config field `output_dir`: /runs/nightly holds checkpoints of another config "
            "(c0ffee, differs in ppo.kl_coef: 0.05 -> 0.1) — use a new output_dir for a changed config, "
            "or delete the old run",
        ),
        (
            {"world_size": 4},
            "config field `output_dir`: /runs/nightly holds checkpoints written by 2 process(es), and this run "
            "has 4 — resume with 2 process(es) (runtime.num_processes, or accelerate launch --num_processes), "
            "or use a new output_dir",
        ),
        (
            {"training": "b" * 64},
            "config field `output_dir`: /runs/nightly holds a training of other models or data (training "
            "fingerprint aaaaaaaaaaaaaaaa, this run's bbbbbbbbbbbbbbbb) — run stage 3 (prepare_dataset) first, "
            "which archives it, or use a new output_dir",
        ),
        (
            {"sharding": {"fsdp": True, "zero_stage": 3}},
            "config field `output_dir`: /runs/nightly holds checkpoints written with runtime.fsdp false and this "
            "run has true — set runtime.fsdp: false to resume it, or use a new output_dir",
        ),
        (
            {"sharding": {"fsdp": False, "zero_stage": None}},
            "config field `output_dir`: /runs/nightly holds checkpoints written with DeepSpeed ZeRO-3 and this "
            "run has no DeepSpeed — resume it with the accelerate config that wrote it "
            "(runtime.accelerate_config), or use a new output_dir",
        ),
    ],
)
def test_each_fact_that_differs_is_refused_in_one_line(change, message):
    with pytest.raises(ConfigError) as refused:
        check_resume(WHERE, STATE, **(SAME | change))
    assert str(refused.value) == message
