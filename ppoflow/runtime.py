"""Processes and devices, through accelerate.

On a machine without CUDA, several processes started by `accelerate launch --multi_gpu` (or
torchrun) must still form one group: accelerate only picks its multi-CPU (gloo) mode when asked for
the CPU, so we ask whenever no GPU is present. One process alone is unaffected.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState

from ppoflow.errors import ConfigError


def process_state() -> PartialState:
    return PartialState(cpu=not torch.cuda.is_available())


def check_mixed_precision() -> None:
    """`accelerate launch --mixed_precision fp16` is refused: accelerate then makes a GradScaler that
    only an optimizer prepared by accelerate would use, so the loss would be scaled and never
    unscaled and the steps wrong without any error."""
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() == "fp16":
        raise ConfigError(
            "accelerate --mixed_precision",
            "fp16 is not supported (its loss scaling needs an optimizer that ppoflow does not hand to accelerate)",
            "use bf16 (models.dtype: bfloat16, or auto on a GPU) or --mixed_precision no",
        )


def make_accelerator() -> Accelerator:
    check_mixed_precision()
    process_state()
    return Accelerator(cpu=not torch.cuda.is_available())
