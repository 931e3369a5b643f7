"""A reward that turns NaN, or so large that a loss overflows: training stops at that update with
the update and the metric named in one line, and the last good checkpoint is kept, intact."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from ppoflow.checkpoint import verify_checkpoint
from tests.reliability.faulty_rewards import GOOD_UPDATES
from tests.reliability.helpers import checkpoint_steps, error_lines, read_metrics

pytestmark = pytest.mark.slow

CASES = [
    pytest.param("nan_after_two_updates", r"objective/scores", id="nan-reward"),
    pytest.param("huge_after_two_updates", r"loss/(policy|value)", id="loss-overflow"),
]


@pytest.mark.parametrize(("function", "metric"), CASES)
def test_a_non_finite_reward_or_loss_stops_training_at_that_update(train_run, faults, function, metric):
    faulty = f"reward_functions=[{{path: 'tests.reliability.faulty_rewards:{function}', name: faulty, weight: 1.0}}]"
    child, output_dir, log = train_run(function, faulty)
    faults.injected("non-finite training value", reward_function=function)
    assert child.wait(600) == 2, log.read_text()[-3000:]

    bad_update = GOOD_UPDATES + 1
    (line,) = error_lines(log.read_text())
    assert re.match(
        rf"error: update {bad_update}: `{metric}` is not finite — .*the "
        rf"last good checkpoint is kept in {output_dir / 'checkpoints'}$",
        line,
    ), line
    assert "Traceback" not in log.read_text()
    assert [row["update"] for row in read_metrics(output_dir)] == list(range(1, bad_update))
    assert checkpoint_steps(output_dir) == [0, GOOD_UPDATES - 1, GOOD_UPDATES]
    last_good = output_dir / "checkpoints" / f"step-{GOOD_UPDATES:06d}"
    verify_checkpoint(last_good)
    assert all(
        torch.isfinite(tensor).all() for tensor in load_file(last_good / "policy" / "model.safetensors").values()
    )
    assert not (output_dir / "final").exists() and not (output_dir / "eval.json").exists()
