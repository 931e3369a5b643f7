"""Processes and devices, through accelerate.

On a machine without CUDA, several processes started by `accelerate launch --multi_gpu` (or
torchrun) must still form one group: accelerate only picks its multi-CPU (gloo) mode when asked for
the CPU, so we ask whenever no GPU is present. One process alone is unaffected.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator, PartialState


def process_state() -> PartialState:
    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator() -> Accelerator:
    process_state()
    return Accelerator(cpu=not torch.cuda.is_available())
