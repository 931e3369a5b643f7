"""Learning-rate schedules: the multiplier of the peak rate after `step` optimizer steps.

The same four shapes as `transformers.get_scheduler` (linear, cosine with half a cycle, constant,
constant with warmup; the warmup is linear from 0). Written here because importing
`transformers.optimization` pulls in `transformers.trainer_utils` and, through it, peft: ~15 MiB of
resident memory in every training process for four one-line formulas.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, *, kind: str, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"ppo.lr_scheduler_type: unknown schedule {kind!r}")


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps for a ratio of all optimizer steps, rounded up as transformers'
    `TrainingArguments.get_warmup_steps` (and so TRL) does; the tolerance keeps 0.7 × 10 at 7, not 8."""
    return math.ceil(warmup_ratio * total_steps - 1e-9)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A LambdaLR whose state dict is the same as `transformers.get_scheduler`'s (checkpoints load either way)."""
    if kind == "constant":
        warmup_steps = 0
    return LambdaLR(optimizer, partial(lr_multiplier, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps))
