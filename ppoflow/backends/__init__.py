"""How the policy and the value model train across processes: one `Backend` per way
(`base.py` says what the trainer asks of one), chosen from the run's `Sharding`."""

from __future__ import annotations

from accelerate import Accelerator

from ppoflow.backends.base import AtResponseTokens, Backend, decay_parameter_groups
from ppoflow.backends.ddp import DDPBackend
from ppoflow.backends.fsdp import FSDPBackend
from ppoflow.backends.zero import ZeroBackend
from ppoflow.batching import BatchPlan
from ppoflow.config import PPOConfig
from ppoflow.runtime import Sharding

__all__ = ["AtResponseTokens", "Backend", "decay_parameter_groups", "make_backend"]


def make_backend(plan: Sharding, accelerator: Accelerator, ppo: PPOConfig, batch: BatchPlan) -> Backend:
    """The backend of the run's sharding: DeepSpeed ZeRO, FSDP2, or DDP (one process included)."""
    if plan.zero_stage:
        kind = ZeroBackend
    elif plan.fsdp:
        kind = FSDPBackend
    else:
        kind = DDPBackend
    return kind(accelerator, plan, ppo, batch)
