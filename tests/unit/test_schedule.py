"""Learning-rate schedules: golden multipliers by hand, and the same numbers as transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from ppoflow.schedule import lr_multiplier, make_scheduler, warmup_steps


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # 10 steps, 2 of warmup: 0, 1/2, then linear decay over the remaining 8 steps.
        ("linear", [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]),
        # cosine after warmup: 0.5 * (1 + cos(pi * k / 8)); k = 2 gives 0.5 * (1 + 1/sqrt 2) = 0.853553...
        (
            "cosine",
            [
                0.0,
                0.5,
                1.0,
                0.9619397663,
                0.8535533906,
                0.6913417162,
                0.5,
                0.3086582838,
                0.1464466094,
                0.0380602337,
                0.0,
            ],
        ),
        ("constant_with_warmup", [0.0, 0.5] + [1.0] * 9),
    ],
)
def test_schedules_by_hand(kind, expected):
    actual = [lr_multiplier(step, kind=kind, warmup_steps=2, total_steps=10) for step in range(11)]
    assert actual == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_same_learning_rates_and_state_as_transformers(kind):
    def rates(scheduler, optimizer):
        seen = []
        for _ in range(12):
            seen.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return seen

    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    theirs_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    ours = make_scheduler(ours_opt, kind, warmup_steps=3, total_steps=12)
    theirs = get_scheduler(kind, theirs_opt, num_warmup_steps=3, num_training_steps=12)
    assert rates(ours, ours_opt) == pytest.approx(rates(theirs, theirs_opt), abs=1e-12)
    # A checkpoint written with either loads into the other and continues on the same curve.
    resumed_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    resumed = make_scheduler(resumed_opt, kind, warmup_steps=3, total_steps=12)
    resumed.load_state_dict(theirs.state_dict())
    resumed_opt.load_state_dict(theirs_opt.state_dict())
    assert resumed.get_last_lr() == pytest.approx(theirs.get_last_lr(), abs=1e-12)


@pytest.mark.parametrize(
    ("ratio", "total", "expected"),
    [(0.15, 10, 2), (0.05, 30, 2), (0.1, 10, 1), (0.7, 10, 7), (0.0, 10, 0), (0.01, 12, 1)],
)
def test_warmup_steps_round_up_like_transformers(ratio, total, expected):
    # transformers (and so TRL) rounds warmup_ratio × steps up: 1.5 -> 2, 0.12 -> 1; exact products stay
    assert warmup_steps(ratio, total) == expected
