"""DeepSpeed ZeRO training of the policy and the value model (an accelerate config with
`distributed_type: DEEPSPEED`; the `deepspeed` extra).

The two models train as one DeepSpeed engine over a `PolicyAndValue` module, so that one ZeRO
optimizer spans both, as the single AdamW of the other paths does, and the gradient clipping is
over their joint norm: one forward gives the policy's logits and the values, one backward their
summed loss. ZeRO-1 partitions the AdamW state over the processes, ZeRO-2 the gradients too, ZeRO-3
the parameters too (each gathered for its module's forward and backward by DeepSpeed's hooks).
accelerate still forms the process group; its DeepSpeed plugin is not used (it takes one model and
one optimizer per `prepare`, and would own the scheduler and the precision).

Rollout and evaluation run the inner Hugging Face models directly, a different number of forwards
on each process: under ZeRO-3 they run inside `gathered` (the backend's `whole`), where every parameter is gathered and
DeepSpeed's hooks are lifted, so no forward issues a collective (the way TRL 1.12 generates under
ZeRO-3). Checkpoints hold the full weights (Hugging Face directories, as any other run) and every
process's ZeRO optimizer partition, gathered to the main process, which writes them.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ppoflow.backends.base import Backend, MicroBatch

log = logging.getLogger(__name__)

FROM_ENGINE = "ppoflow_from_engine"  # the keys of a saved partition to take from the resuming engine


class PolicyAndValue(nn.Module):
    """The policy's logits and the value model's values of one layout, behind one forward (the
    engine's): both `AtResponseTokens` wrappers."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids, attention_mask, position_ids, before) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(input_ids, attention_mask, position_ids, before), self.value(
            input_ids, attention_mask, position_ids, before
        )


def import_deepspeed():
    """deepspeed, on this machine's accelerator (its CPU one, with gloo, where there is no GPU)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def engine_config(
    stage: int, *, micro_batch_size: int, accumulation: int, world_size: int, max_grad_norm: float | None
) -> dict[str, Any]:
    """The DeepSpeed config of the engine: ZeRO `stage`, fp32 parameters (bf16 compute is the
    config's autocast, as without DeepSpeed), ppoflow's accumulation and clipping."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world_size,
        "gradient_clipping": max_grad_norm or 0.0,
        "zero_optimization": {"stage": stage},
        # ppoflow's AdamW (torch's, fused where it can be), which ZeRO steps on its partitions.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def initialize(module: PolicyAndValue, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """The engine over `module`, its ZeRO optimizer wrapping `optimizer` (whose param groups, and so
    the scheduler's learning rates, it keeps)."""
    deepspeed = import_deepspeed()
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def stage_of(engine) -> int:
    return int(engine.zero_optimization_stage())


@contextmanager
def gathered(engine) -> Iterator[None]:
    """Every parameter of the engine's module whole for the block, and no collective in its forwards
    (ZeRO-3: gathered, DeepSpeed's module hooks lifted, then put back; ZeRO-1/2 keep parameters whole
    anyway). Entering and leaving are collectives under ZeRO-3: all processes, together."""
    if engine is None or stage_of(engine) < 3:
        yield
        return
    deepspeed = import_deepspeed()
    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for parameter in engine.module.parameters():
            parameter.ds_active_sub_modules.clear()
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


def _plain(value: Any) -> bool:
    """Whether `value` unpickles under `torch.load(weights_only=True)`: tensors and plain data only."""
    if isinstance(value, torch.Tensor) or value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) in (list, tuple):
        return all(_plain(item) for item in value)
    if type(value) in (dict, OrderedDict):
        return all(type(key) in (int, str) and _plain(item) for key, item in value.items())
    return False


def optimizer_partitions(engine) -> list[dict[str, Any]] | None:
    """Every process's ZeRO optimizer state (its partition of the fp32 weights and AdamW moments),
    by process index, on the main process (None on the others). All processes call it.

    Entries that are DeepSpeed objects (its loss scaler, its stage enum, its parameter-slice map)
    are left out, so the checkpoint unpickles as tensors only (`checkpoint.load_tensors`): they
    describe the engine, not the training, and are taken from the resuming engine."""
    import torch.distributed as dist

    state = engine.optimizer.state_dict()
    plain = {key: value for key, value in state.items() if _plain(value)}
    plain[FROM_ENGINE] = sorted(set(state) - set(plain))
    partitions = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(plain, partitions, dst=0)
    return partitions


def load_optimizer_partitions(engine, partitions: list[dict[str, Any]]) -> None:
    """Each process takes its partition of what `optimizer_partitions` saved, fp32 weights included."""
    own = engine.optimizer.state_dict()
    merged = [
        {
            **{key: own[key] for key in partition.get(FROM_ENGINE, [])},
            **{key: value for key, value in partition.items() if key != FROM_ENGINE},
        }
        for partition in partitions
    ]
    engine.optimizer.load_state_dict(merged, load_optimizer_states=True, load_from_fp32_weights=True)


def global_grad_norm(engine) -> torch.Tensor:
    norm = engine.get_global_grad_norm()
    return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)


class EngineMicroBatch(MicroBatch):
    """A micro-batch through the engine: both models in its one forward (at `policy`; `value` hands
    back what it gave), both losses summed into its one backward at the micro-batch's end, then its
    step, which counts the micro-batch and steps ZeRO's optimizer (clipped) at the accumulation boundary."""

    def __init__(self, backend: ZeroBackend):
        super().__init__(backend)
        self.values: torch.Tensor | None = None
        self.losses: list[torch.Tensor] = []

    def policy(self, *inputs) -> torch.Tensor:
        logits, self.values = self.backend.engine(*inputs)
        return logits

    def value(self, *inputs) -> torch.Tensor:
        return self.values

    def backward(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def close(self) -> None:
        # Scaled by the trainer as in the other backends, not by the engine (scale_wrt_gas), so the
        # gradients are the same numbers. Its hooks reduce (and partition) them.
        self.backend.engine.backward(sum(self.losses[1:], self.losses[0]), scale_wrt_gas=False)
        self.backend.engine.step()


class ZeroBackend(Backend):
    def _wrap(self, ref: nn.Module, reward: nn.Module) -> None:
        """Both wrappers go behind the engine's one forward (`PolicyAndValue`), made in `_start`."""

    def _start(self) -> None:
        batch = self.batch
        self.engine = initialize(
            PolicyAndValue(self.policy_wrapper, self.value_wrapper),
            self.optimizer,
            engine_config(
                self.plan.zero_stage,
                micro_batch_size=batch.local_micro_batch_size,
                accumulation=batch.micro_batches_per_mini_batch,
                world_size=batch.world_size,
                max_grad_norm=self.ppo.max_grad_norm,
            ),
        )

    @contextmanager
    def whole(self, *models: str) -> Iterator[None]:
        # The engine holds both trained models; the frozen ones are whole anyway.
        if {"policy", "value"} & set(models):
            with gathered(self.engine):
                yield
        else:
            yield

    @contextmanager
    def micro_batch(self, sync: bool) -> Iterator[MicroBatch]:
        micro = EngineMicroBatch(self)
        yield micro
        micro.close()

    def clip_gradients(self) -> torch.Tensor:
        """The engine's step at the accumulation boundary clipped: the norm it found."""
        return global_grad_norm(self.engine)

    def step(self) -> None:
        # The engine's step at the accumulation boundary stepped ZeRO's optimizer and zeroed the gradients.
        self.scheduler.step()

    @contextmanager
    def checkpoint_state(self) -> Iterator[tuple[dict | None, dict | None, Any]]:
        # Every process's partition, on the main process; ZeRO-3: the parameters gathered whole to be written.
        partitions = optimizer_partitions(self.engine)
        with gathered(self.engine):
            yield None, None, partitions

    def _load_optimizer_state(self, state: Any) -> None:
        load_optimizer_partitions(self.engine, state)
