"""The batch arithmetic a run derives from `ppo` and its number of processes (`BatchPlan`)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from ppoflow.config import PPOConfig
from ppoflow.errors import ConfigError


class BatchPlan(BaseModel):
    """Derived batch arithmetic, exactly TRL 1.12's `PPOConfig`: a rollout batch is
    `per_device_train_batch_size × gradient_accumulation_steps` prompts per process, split into
    `num_mini_batches` mini-batches; each mini-batch is processed in micro-batches of at most
    `per_device_train_batch_size` and ends with one optimizer step (TRL stepped only every
    `gradient_accumulation_steps` micro-batches, i.e. once per epoch, whatever `num_mini_batches`)."""

    model_config = ConfigDict(frozen=True)

    world_size: int
    local_batch_size: int
    batch_size: int
    local_mini_batch_size: int
    mini_batch_size: int
    local_micro_batch_size: int
    micro_batch_size: int
    micro_batches_per_mini_batch: int
    num_updates: int
    optimizer_steps: int

    @classmethod
    def derive(cls, ppo: PPOConfig, world_size: int = 1) -> BatchPlan:
        local_batch = ppo.per_device_train_batch_size * ppo.gradient_accumulation_steps
        batch = local_batch * world_size
        if local_batch % ppo.num_mini_batches:
            raise ConfigError(
                "ppo.num_mini_batches",
                f"{ppo.num_mini_batches} does not divide the per-process rollout batch of {local_batch} "
                "(per_device_train_batch_size × gradient_accumulation_steps)",
                f"choose a divisor of {local_batch}",
            )
        local_mini = local_batch // ppo.num_mini_batches
        local_micro = min(ppo.per_device_train_batch_size, local_mini)
        if local_mini % local_micro:
            raise ConfigError(
                "ppo.per_device_train_batch_size",
                f"{local_micro} does not divide the per-process mini-batch of {local_mini}",
                "make gradient_accumulation_steps a multiple of num_mini_batches",
            )
        if ppo.total_episodes < batch:
            raise ConfigError(
                "ppo.total_episodes",
                f"{ppo.total_episodes} is smaller than one rollout batch of {batch} "
                f"(per_device_train_batch_size × gradient_accumulation_steps × {world_size} processes)",
                f"set it to at least {batch} or shrink the batch",
            )
        num_updates = math.ceil(ppo.total_episodes / batch)
        return cls(
            world_size=world_size,
            local_batch_size=local_batch,
            batch_size=batch,
            local_mini_batch_size=local_mini,
            mini_batch_size=local_mini * world_size,
            local_micro_batch_size=local_micro,
            micro_batch_size=local_micro * world_size,
            micro_batches_per_mini_batch=local_mini // local_micro,
            num_updates=num_updates,
            optimizer_steps=num_updates * ppo.num_ppo_epochs * ppo.num_mini_batches,
        )
