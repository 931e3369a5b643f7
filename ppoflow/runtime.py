"""Processes and devices, through accelerate.

On a machine without CUDA, several processes started by `accelerate launch --multi_gpu` (or
torchrun) must still form one group: accelerate only picks its multi-CPU (gloo) mode when asked for
the CPU, so we ask whenever no GPU is present. One process alone is unaffected.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator, PartialState

from ppoflow.config import RuntimeConfig
from ppoflow.errors import ConfigError

log = logging.getLogger(__name__)

# cuBLAS reuses its workspace across streams nondeterministically unless given fixed buffers
# (CUDA >= 10.2, "Reproducibility" in torch's notes); read when cuBLAS makes its first handle.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
CUBLAS_DETERMINISTIC_SETTINGS = (CUBLAS_DETERMINISTIC_WORKSPACE, ":16:8")


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


def configure_torch(runtime: RuntimeConfig) -> None:
    """Apply `runtime` to this process, before its first model forward (cuBLAS reads its workspace
    setting once, when CUDA makes its first handle, so the engine calls this before loading models).

    Deterministic: torch picks deterministic kernels (and warns, rather than fails, for an op that has
    none, so a long run is not lost to it); cuDNN does not autotune. On CPU every kernel ppoflow runs
    is deterministic already, so the switch changes nothing there."""
    if runtime.num_threads is not None and torch.get_num_threads() != runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    if runtime.deterministic:
        workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        if workspace not in CUBLAS_DETERMINISTIC_SETTINGS:
            log.warning("CUBLAS_WORKSPACE_CONFIG=%s is not one of cuBLAS's deterministic settings %s", workspace, CUBLAS_DETERMINISTIC_SETTINGS)
    torch.use_deterministic_algorithms(runtime.deterministic, warn_only=True)
    # Filling every torch.empty with NaN is a debugging aid against reading uninitialised memory, not
    # a need of determinism, and costs ~20 % of a CPU toy run.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = runtime.deterministic
    torch.backends.cudnn.benchmark = not runtime.deterministic
