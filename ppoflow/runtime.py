"""Processes and devices, through accelerate.

On a machine without CUDA, several processes started by `accelerate launch --multi_gpu` (or
torchrun) must still form one group: accelerate only picks its multi-CPU (gloo) mode when asked for
the CPU, so we ask whenever no GPU is present. One process alone is unaffected.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

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


# What `runtime.accelerate_config` may ask for: plain data parallelism on one machine.
DATA_PARALLEL_TYPES = ("MULTI_GPU", "MULTI_CPU", "NO")


def read_accelerate_config(runtime: RuntimeConfig) -> dict:
    """`runtime.accelerate_config` read and checked for what ppoflow's launch can honour (stage 1);
    {} when none is set. Refusals name the field and the fix, in one line."""
    import yaml

    path, field = runtime.accelerate_config, "runtime.accelerate_config"
    if path is None:
        return {}
    try:
        settings = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(field, f"{path} cannot be read ({reason})", "give the path of a file `accelerate config` wrote") from None
    if not isinstance(settings, dict):
        raise ConfigError(field, f"{path} is not a YAML mapping of accelerate settings", "give the path of a file `accelerate config` wrote")
    kind = str(settings.get("distributed_type", "MULTI_GPU")).upper()
    if kind in ("FSDP", "DEEPSPEED"):
        raise ConfigError(
            field, f"{path} asks for distributed_type {kind}: ppoflow shards the policy and value itself (accelerate's plugin "
            "takes one model) and DeepSpeed is not built", "set distributed_type: MULTI_GPU there and runtime.fsdp: true",
        )
    if kind not in DATA_PARALLEL_TYPES:
        raise ConfigError(field, f"{path} asks for distributed_type {kind}", f"use one of {', '.join(DATA_PARALLEL_TYPES)}")
    if int(settings.get("num_machines", 1) or 1) != 1:
        raise ConfigError(
            field, f"{path} is for {settings['num_machines']} machines, and a flow run launches on its own machine only",
            "set num_machines: 1 (several machines: docs/SCALING.md)",
        )
    if "num_processes" in settings and int(settings["num_processes"]) != runtime.num_processes:
        raise ConfigError(
            field, f"{path} says num_processes {settings['num_processes']} and runtime.num_processes is {runtime.num_processes}",
            "make them equal, or leave num_processes out of the file",
        )
    gpu_ids = str(settings.get("gpu_ids", "all")).strip()
    if gpu_ids != "all" and torch.cuda.is_available():
        ids = [part for part in gpu_ids.split(",") if part.strip()]
        if len(ids) < runtime.num_processes:
            raise ConfigError(
                field, f"{path} gives gpu_ids {gpu_ids} ({len(ids)} GPU(s)) to {runtime.num_processes} processes",
                "list one GPU per process, or lower runtime.num_processes",
            )
    return settings


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
