"""Processes and devices, through accelerate.

On a machine without CUDA, several processes started by `accelerate launch --multi_gpu` (or
torchrun) must still form one group: accelerate only picks its multi-CPU (gloo) mode when asked for
the CPU, so we ask whenever no GPU is present. One process alone is unaffected.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator, PartialState

from ppoflow.atomic import write_text_atomic
from ppoflow.config import PPOConfig, RuntimeConfig
from ppoflow.errors import ConfigError
from ppoflow.preflight import read_text_file

log = logging.getLogger(__name__)

# cuBLAS reuses its workspace across streams nondeterministically unless given fixed buffers
# (CUDA >= 10.2, "Reproducibility" in torch's notes); read when cuBLAS makes its first handle.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
CUBLAS_DETERMINISTIC_SETTINGS = (CUBLAS_DETERMINISTIC_WORKSPACE, ":16:8")


def process_state(runtime: RuntimeConfig | None = None) -> PartialState:
    """This process's place among the run's processes. The first call forms the process group: the
    engine's entry points make it with the run's `runtime` (its collectives' timeout); later calls,
    with or without, get the same state."""
    options = {}
    if runtime is not None and runtime.collective_timeout_seconds is not None:
        options["timeout"] = timedelta(seconds=runtime.collective_timeout_seconds)
    return PartialState(cpu=not torch.cuda.is_available(), **options)


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


def check_launched_plain() -> None:
    """`accelerate launch` in its FSDP or DeepSpeed mode is refused: ppoflow shards itself and gives
    accelerate no model to wrap, so accelerate's plugin would be set up for nothing, or in the way."""
    for variable, mode in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "false").lower() == "true":
            raise ConfigError(
                "accelerate launch",
                f"started these processes in accelerate's {mode} mode, which ppoflow does not use",
                f"launch plain processes (--multi_gpu, or distributed_type: MULTI_GPU) and give the {mode} file as "
                "runtime.accelerate_config",
            )


# What `runtime.accelerate_config` may ask for: plain data parallelism (sharding is runtime.fsdp).
DATA_PARALLEL_TYPES = ("MULTI_GPU", "MULTI_CPU", "NO")


def distributed_type(settings: dict) -> str:
    """An accelerate config's distributed_type (accelerate's default: MULTI_GPU)."""
    return str(settings.get("distributed_type", "MULTI_GPU")).upper()


def read_accelerate_config(runtime: RuntimeConfig) -> dict:
    """`runtime.accelerate_config` read and checked for what ppoflow's launch can honour (stage 1);
    {} when none is set. Refusals name the field and the fix, in one line."""
    import yaml

    path, field = runtime.accelerate_config, "runtime.accelerate_config"
    if path is None:
        return {}
    text = read_text_file(path, field, "give the path of a file `accelerate config` wrote")
    try:
        settings = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            field, f"{path} cannot be read ({reason})", "give the path of a file `accelerate config` wrote"
        ) from None
    if not isinstance(settings, dict):
        raise ConfigError(
            field,
            f"{path} is not a YAML mapping of accelerate settings",
            "give the path of a file `accelerate config` wrote",
        )
    kind = distributed_type(settings)
    if kind == "DEEPSPEED":
        _check_deepspeed_settings(settings, path, field)
    elif kind == "FSDP":
        _check_fsdp_settings(settings.get("fsdp_config") or {}, path, field)
    elif kind not in DATA_PARALLEL_TYPES:
        raise ConfigError(
            field,
            f"{path} asks for distributed_type {kind}",
            f"use one of {', '.join((*DATA_PARALLEL_TYPES, 'FSDP', 'DEEPSPEED'))}",
        )
    precision = str(settings.get("mixed_precision", "no")).lower()
    if precision != "no":
        raise ConfigError(
            field,
            f"{path} asks for mixed_precision {precision}, and ppoflow's precision is the config's",
            "set mixed_precision: 'no' there and models.dtype (bfloat16, or auto on a GPU) in the run config",
        )
    machines = machine_count(settings)
    if machines > 1:
        _check_machines(settings, machines, runtime.num_processes, f"{path}", field)
    if "num_processes" in settings and int(settings["num_processes"]) != runtime.num_processes:
        raise ConfigError(
            field,
            f"{path} says num_processes {settings['num_processes']} "
            f"and runtime.num_processes is {runtime.num_processes}",
            "make them equal, or leave num_processes out of the file",
        )
    gpu_ids = str(settings.get("gpu_ids", "all")).strip()
    per_machine = runtime.num_processes // machines
    if gpu_ids != "all" and torch.cuda.is_available():
        ids = [part for part in gpu_ids.split(",") if part.strip()]
        if len(ids) < per_machine:
            raise ConfigError(
                field,
                f"{path} gives gpu_ids {gpu_ids} ({len(ids)} GPU(s)) to {per_machine} processes on this machine",
                "list one GPU per process, or lower runtime.num_processes",
            )
    return settings


# accelerate's FSDP settings (`fsdp_config` in an `accelerate config` file) that ppoflow's own
# sharding (`ppoflow.backends.fsdp`, FSDP2) does as they say, with the values that say it. Any other key or
# value is refused: a setting that would do nothing is not taken silently.
class Setting(NamedTuple):
    """A key of an accelerate config section ppoflow takes: the values it takes (none listed: any),
    what ppoflow does, and the fix for another value (default: one of the values it takes)."""

    accepted: tuple[Any, ...]
    meaning: str
    fix: str | None = None


FSDP_SETTINGS: dict[str, tuple] = {  # each: a Setting's fields
    "fsdp_version": ((1, 2), "ppoflow shards with FSDP2 (fully_shard) either way"),
    "fsdp_sharding_strategy": (("FULL_SHARD", 1), "parameters, gradients and optimizer state are all sharded"),
    "fsdp_reshard_after_forward": ((True, "FULL_SHARD"), "each layer is freed after its forward (FULL_SHARD)"),
    "fsdp_auto_wrap_policy": (("TRANSFORMER_BASED_WRAP",), "each decoder layer is one group"),
    "fsdp_transformer_layer_cls_to_wrap": (
        (),
        "the decoder layer classes to shard apart (default: the model's _no_split_modules)",
    ),
    "fsdp_state_dict_type": (
        ("FULL_STATE_DICT",),
        "checkpoints hold full state dicts, in the format of an unsharded run",
    ),
    "fsdp_offload_params": ((False,), "parameters stay on the training device (CPU offload is not built)"),
    "fsdp_cpu_ram_efficient_loading": ((False,), "every process loads the weights itself, then keeps its shards"),
    "fsdp_sync_module_states": (
        (True, False),
        "every process loads the same weights, so they start in sync either way",
    ),
    "fsdp_use_orig_params": ((True,), "FSDP2 keeps the original parameters (as DTensor shards)"),
    "fsdp_backward_prefetch": (("BACKWARD_PRE",), "FSDP2 all-gathers the next layer before each layer's backward"),
    "fsdp_forward_prefetch": ((False,), "FSDP2 all-gathers each layer at its forward"),
    "fsdp_activation_checkpointing": (
        (False,),
        "activation checkpointing is ppo.gradient_checkpointing",
        "set ppo.gradient_checkpointing: true instead",
    ),
}


# accelerate's DeepSpeed settings (`deepspeed_config` in an `accelerate config` file) that ppoflow's
# engine (`ppoflow.backends.zero`) does as they say. gradient_accumulation_steps and gradient_clipping, the
# run config's own, are checked against it in stage 1 (`check_sharding_plan`).
DEEPSPEED_SETTINGS: dict[str, tuple] = {  # each: a Setting's fields
    "zero_stage": ((1, 2, 3), "ZeRO partitions the optimizer state (1), the gradients too (2), the parameters too (3)"),
    "offload_optimizer_device": (("NONE",), "the optimizer state stays on the training device (offload is not built)"),
    "offload_param_device": (("NONE",), "the parameters stay on the training device (offload is not built)"),
    "zero3_init_flag": ((False,), "every process loads the weights whole, then ZeRO partitions them"),
    "zero3_save_16bit_model": ((False,), "checkpoints hold the full weights in the models' own precision"),
    "deepspeed_multinode_launcher": (
        ("STANDARD",),
        "ppoflow launches every machine's processes with accelerate's standard launcher",
    ),
    "gradient_accumulation_steps": ((), "checked against ppo.gradient_accumulation_steps"),
    "gradient_clipping": ((), "checked against ppo.max_grad_norm"),
}


def _check_deepspeed_settings(settings: dict, path: Path, field: str) -> None:
    deepspeed = settings.get("deepspeed_config") or {}
    if not isinstance(deepspeed, dict):
        raise ConfigError(
            field, f"{path}: deepspeed_config is not a mapping", "give it as `accelerate config` writes it"
        )
    if "deepspeed_config_file" in deepspeed:
        raise ConfigError(
            field,
            f"{path} gives a deepspeed_config_file, and ppoflow builds the DeepSpeed config from the run config",
            "give deepspeed_config.zero_stage (1, 2 or 3) instead",
        )
    if "zero_stage" not in deepspeed:
        raise ConfigError(
            field,
            f"{path} asks for DeepSpeed and gives no deepspeed_config.zero_stage",
            "set zero_stage: 1, 2 or 3 there",
        )
    _check_known(deepspeed, DEEPSPEED_SETTINGS, "deepspeed_config", path, field)
    try:
        import deepspeed as _  # noqa: F401
    except ImportError:
        raise ConfigError(
            field,
            f"{path} asks for DeepSpeed, which is not installed",
            "pip install 'ppoflow[deepspeed]' on every machine",
        ) from None


def _check_known(section: dict, known: dict[str, tuple], name: str, path: Path, field: str) -> None:
    """Every key of `section` is one of `known`, with one of its accepted values (none listed: any)."""
    for key, raw in section.items():
        if key not in known:
            raise ConfigError(field, f"{path} sets {name}.{key}, which ppoflow does not do", "remove it")
        setting = Setting(*known[key])
        if setting.accepted and _setting_value(raw) not in setting.accepted:
            wanted = " or ".join(
                str(option).lower() if isinstance(option, bool) else str(option) for option in setting.accepted
            )
            fix = setting.fix or f"set it to {wanted}"
            raise ConfigError(
                field, f"{path} sets {name}.{key}: {raw}, and with ppoflow {setting.meaning}", f"{fix} (or remove it)"
            )


def _setting_value(value: Any) -> Any:
    """A YAML value as `accelerate config` may write it ('true', 1, 'full_shard') in one spelling."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return int(text) if text.isdigit() else text.upper()


def _check_fsdp_settings(fsdp: Any, path: Path, field: str) -> None:
    if not isinstance(fsdp, dict):
        raise ConfigError(field, f"{path}: fsdp_config is not a mapping", "give it as `accelerate config` writes it")
    _check_known(fsdp, FSDP_SETTINGS, "fsdp_config", path, field)


@dataclass(frozen=True)
class Sharding:
    """How the trained models are sharded: `runtime.fsdp`, or an accelerate config asking for FSDP
    or DeepSpeed ZeRO."""

    fsdp: bool = False
    frozen: bool = False  # the reference and the reward model too (runtime.fsdp_frozen)
    layer_classes: tuple[str, ...] | None = None  # fsdp_transformer_layer_cls_to_wrap, else the models' own
    zero_stage: int | None = None  # DeepSpeed ZeRO's stage (deepspeed_config.zero_stage)

    @property
    def recorded(self) -> dict[str, Any]:
        """What a checkpoint's state.json records of it (`workspace.check_resume` compares)."""
        return {"fsdp": self.fsdp, "zero_stage": self.zero_stage}


def sharding(runtime: RuntimeConfig, settings: dict | None = None) -> Sharding:
    """The run's sharding from `runtime` and its accelerate config (`settings`, read if not given)."""
    settings = read_accelerate_config(runtime) if settings is None else settings
    kind = distributed_type(settings)
    from_file = kind == "FSDP"
    classes = (settings.get("fsdp_config") or {}).get("fsdp_transformer_layer_cls_to_wrap") if from_file else None
    if isinstance(classes, str):
        classes = [name.strip() for name in classes.split(",") if name.strip()]
    zero_stage = None
    if kind == "DEEPSPEED":
        zero_stage = int(_setting_value((settings.get("deepspeed_config") or {})["zero_stage"]))
    return Sharding(
        fsdp=runtime.fsdp or from_file,
        frozen=runtime.fsdp_frozen,
        layer_classes=tuple(classes) if classes else None,
        zero_stage=zero_stage,
    )


def check_sharding_plan(
    runtime: RuntimeConfig, lora: bool, ppo: PPOConfig | None = None, settings: dict | None = None
) -> Sharding:
    """Stage 1: the sharding the run asks for is one that can run (one-line refusals otherwise).
    `settings`: its accelerate config as `read_accelerate_config` returned it (read if not given)."""
    settings = read_accelerate_config(runtime) if settings is None else settings
    plan = sharding(runtime, settings)
    if plan.zero_stage is not None:
        _check_zero_plan(runtime, plan, lora, ppo, settings.get("deepspeed_config") or {})
        return plan
    field = "runtime.accelerate_config" if plan.fsdp and not runtime.fsdp else "runtime.fsdp"
    if plan.fsdp and runtime.num_processes < 2:
        raise ConfigError(
            field,
            "asks for sharded training and runtime.num_processes is "
            f"{runtime.num_processes}: there is nothing to shard over",
            "set runtime.num_processes to 2 or more (one process per GPU), or train unsharded",
        )
    if plan.fsdp and lora:
        raise ConfigError(
            field,
            "asks for sharded training and peft.enabled is true: LoRA with FSDP is not built",
            "train unsharded (LoRA's few trained weights fit on every process) or set peft.enabled: false",
        )
    if plan.frozen and not plan.fsdp:
        raise ConfigError(
            "runtime.fsdp_frozen",
            "is true and the policy is not sharded: the frozen models are sharded only beside a sharded policy",
            "set runtime.fsdp: true as well (or distributed_type: FSDP in "
            "runtime.accelerate_config), or runtime.fsdp_frozen: false",
        )
    return plan


def _check_zero_plan(
    runtime: RuntimeConfig, plan: Sharding, lora: bool, ppo: PPOConfig | None, deepspeed: dict
) -> None:
    field = "runtime.accelerate_config"
    if plan.fsdp:
        raise ConfigError(
            "runtime.fsdp",
            "is true and runtime.accelerate_config asks for DeepSpeed: one sharding at a time",
            "set runtime.fsdp: false, or give an accelerate config without DeepSpeed",
        )
    if runtime.fsdp_frozen:
        raise ConfigError(
            "runtime.fsdp_frozen",
            "is true and runtime.accelerate_config asks for DeepSpeed, which keeps the frozen models whole",
            "set runtime.fsdp_frozen: false",
        )
    if runtime.num_processes < 2:
        raise ConfigError(
            field,
            f"asks for DeepSpeed ZeRO and runtime.num_processes is {runtime.num_processes}: there is nothing to "
            "partition over",
            "set runtime.num_processes to 2 or more (one process per GPU), or train without DeepSpeed",
        )
    if lora:
        raise ConfigError(
            field,
            "asks for DeepSpeed ZeRO and peft.enabled is true: LoRA with DeepSpeed is not built",
            "train without DeepSpeed (LoRA's few trained weights fit on every process) or set peft.enabled: false",
        )
    if ppo is None:
        return
    for key, ours, name in (
        ("gradient_accumulation_steps", ppo.gradient_accumulation_steps, "ppo.gradient_accumulation_steps"),
        ("gradient_clipping", ppo.max_grad_norm, "ppo.max_grad_norm"),
    ):
        given = deepspeed.get(key, "auto")
        if str(given).lower() != "auto" and (ours is None or float(given) != float(ours)):
            raise ConfigError(
                field,
                f"sets deepspeed_config.{key}: {given} and {name} is {ours}, the run config's own setting",
                f"set it to auto there (or remove it), and {name} in the run config",
            )


def machine_count(settings: dict[str, Any]) -> int:
    """The machines an accelerate config (as read by `read_accelerate_config`) spans."""
    return int(settings.get("num_machines", 1) or 1)


def launchable_accelerate_config(source: Path, target: Path) -> Path:
    """The accelerate config `accelerate launch` is given: `source` itself, or for a file asking for
    FSDP, a copy at `target` asking for plain processes (distributed_type MULTI_GPU, no fsdp_config):
    ppoflow shards itself, and accelerate refuses its FSDP mode beside the --multi_gpu ppoflow passes.
    The same for DeepSpeed (ppoflow builds its engine itself)."""
    import yaml

    settings = yaml.safe_load(Path(source).expanduser().read_text())
    if distributed_type(settings) not in ("FSDP", "DEEPSPEED"):
        return Path(source).expanduser()
    plain = {key: value for key, value in settings.items() if key not in ("fsdp_config", "deepspeed_config")} | {
        "distributed_type": "MULTI_GPU"
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, yaml.safe_dump(plain, sort_keys=False))
    return target


def _check_machines(settings: dict, machines: int, num_processes: int, path: str, field: str) -> None:
    """A file for several machines: the flow's machine is the main one, which the others can reach,
    and the processes split evenly over them."""
    if int(settings.get("machine_rank", 0) or 0) != 0:
        raise ConfigError(
            field,
            f"{path} is for machine_rank {settings['machine_rank']}, and the flow runs on the main machine (rank 0)",
            "give the flow the main machine's file (machine_rank: 0); the others run `ppoflow join --machine-rank R`",
        )
    if not str(settings.get("main_process_ip") or "").strip():
        raise ConfigError(
            field,
            f"{path} is for {machines} machines and gives no main_process_ip",
            "set main_process_ip to the main machine's address, which the other machines can reach",
        )
    if num_processes % machines or num_processes < machines:
        raise ConfigError(
            field,
            f"{path} is for {machines} machines and runtime.num_processes is {num_processes} (processes in all)",
            f"make runtime.num_processes a multiple of {machines}: as many processes on every machine",
        )


def make_accelerator() -> Accelerator:
    check_mixed_precision()
    check_launched_plain()
    process_state()
    return Accelerator(cpu=not torch.cuda.is_available())


_SAID: set[str] = set()


def configure_torch(runtime: RuntimeConfig) -> None:
    """Apply `runtime` to this process, before its first model forward (cuBLAS reads its workspace
    setting once, when CUDA makes its first handle, so the engine calls this before loading models).

    Deterministic: torch picks deterministic kernels (and warns, rather than fails, for an op that has
    none, so a long run is not lost to it); cuDNN does not autotune. On CPU every kernel ppoflow runs
    is deterministic already, so the switch changes nothing there."""
    if runtime.num_threads is not None and torch.get_num_threads() != runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    if not torch.cuda.is_available():
        chosen = (
            "runtime.num_threads" if runtime.num_threads is not None else "torch's default: runtime.num_threads is null"
        )
        said = f"torch runs on {torch.get_num_threads()} CPU threads ({chosen})"
        if said not in _SAID:  # once per process, not at each stage
            _SAID.add(said)
            log.info("%s", said)
    if runtime.deterministic:
        workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        if workspace not in CUBLAS_DETERMINISTIC_SETTINGS:
            log.warning(
                "CUBLAS_WORKSPACE_CONFIG=%s is not one of cuBLAS's deterministic settings %s",
                workspace,
                CUBLAS_DETERMINISTIC_SETTINGS,
            )
    torch.use_deterministic_algorithms(runtime.deterministic, warn_only=True)
    # Filling every torch.empty with NaN is a debugging aid against reading uninitialised memory, not
    # a need of determinism, and costs ~20 % of a CPU toy run.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = runtime.deterministic
    torch.backends.cudnn.benchmark = not runtime.deterministic
