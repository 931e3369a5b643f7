"""The seam between the PPO update and how the policy and the value model are trained across
processes. A `Backend` holds the two trained models (and, sharded, the frozen ones) and answers the
trainer's few questions; one implementation per way of training, each in its own module:

- `ddp.py`: one process, or DDP over several (accelerate's `prepare_model`): every process whole.
- `fsdp.py`: FSDP2 FULL_SHARD (`runtime.fsdp`, or an accelerate config with `distributed_type: FSDP`).
- `zero.py`: DeepSpeed ZeRO-1/2/3 (an accelerate config with `distributed_type: DEEPSPEED`).

The trainer's one micro-batch path, whatever the backend (`PPOTrainer._micro_batch`):

    with backend.micro_batch(sync) as models:
        logits = models.policy(*inputs);  models.backward(policy loss)
        values = models.value(*inputs);   models.backward(value loss)
    backend.clip_gradients(); backend.step()            # once per mini-batch

A backend may run both models at the first forward and backpropagate the losses summed at the
micro-batch's end (ZeRO's engine: one forward, one backward); the others run and backpropagate each
model in turn, so that only one model's activations are alive at a time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedModel

from ppoflow.batching import BatchPlan
from ppoflow.config import PPOConfig
from ppoflow.forwards import response_logits, token_values
from ppoflow.runtime import Sharding

log = logging.getLogger(__name__)

# transformers' Trainer convention (`Trainer.get_decay_parameter_names`), which TRL's PPOTrainer
# inherits: no weight decay on biases and normalisation weights.
NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")

MODELS = ("policy", "value", "reference", "reward")


class AtResponseTokens(nn.Module):
    """A model's outputs at a layout's `before` positions behind one `forward`, so that DDP, which
    syncs the gradients of what runs through its forward, can wrap it (and FSDP shard it, ZeRO hold it)."""

    def __init__(self, model: PreTrainedModel, read: Callable):
        super().__init__()
        self.model = model
        self.read = read

    def forward(self, input_ids, attention_mask, position_ids, before):
        output = self.read(
            self.model, {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}, before
        )
        # A view (the value head's squeezed output) would escape FSDP2's pre-backward hook if modified in place.
        return output.clone() if output._is_view() else output


def decay_parameter_groups(models: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: `weight_decay` on weights, none on biases
    and normalisation weights (by name, or inside an `nn.LayerNorm`), as transformers' Trainer does."""
    decay, no_decay = [], []
    for model in models:
        in_layer_norm = {
            id(p) for module in model.modules() if isinstance(module, nn.LayerNorm) for p in module.parameters()
        }
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                exempt = id(parameter) in in_layer_norm or NO_DECAY.search(name.lower())
                (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MicroBatch:
    """One micro-batch's forwards and backwards (`Backend.micro_batch`): each model in turn, each
    loss backpropagated at once, through `accelerator.backward`."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def policy(self, *inputs) -> torch.Tensor:
        return self.backend.policy_wrapper(*inputs)

    def value(self, *inputs) -> torch.Tensor:
        return self.backend.value_wrapper(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.backend.accelerator.backward(loss)

    def close(self) -> None:
        """The micro-batch's end, after both losses (not reached on an error)."""


class Backend:
    """How the policy and the value model train across processes. `prepare` wraps the models and
    makes the optimizer; then the trainer reads `policy`/`value` (the Hugging Face models, for
    rollout and saving), `frozen_roots`, `optimizer`, and calls the methods below."""

    def __init__(self, accelerator: Accelerator, plan: Sharding, ppo: PPOConfig, batch: BatchPlan):
        self.accelerator, self.plan, self.ppo, self.batch = accelerator, plan, ppo, batch
        # The sharded reference and reward model (`runtime.fsdp_frozen`), called through their wrappers'
        # forwards; none: they are whole on every process.
        self.frozen_roots: list[nn.Module] = []

    # --------------------------------------------------------------------------- building
    def prepare(
        self,
        policy: PreTrainedModel,
        value: PreTrainedModel,
        ref: nn.Module,
        reward: nn.Module,
        schedule: Callable[[torch.optim.Optimizer], Any],
    ) -> None:
        """Wrap the trained models (and, sharded, the frozen ones); make the optimizer over both and
        its learning-rate scheduler (`schedule(optimizer)`)."""
        self.policy, self.value = policy, value
        self.policy_wrapper = AtResponseTokens(policy, response_logits)
        self.value_wrapper = AtResponseTokens(value, token_values)
        self._wrap(ref, reward)
        if self.ppo.gradient_checkpointing:
            # Non-reentrant: works with a frozen LoRA base too (no inputs that require grad needed).
            for model in (policy, value):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        policy.eval()
        value.eval()
        self.trainable = [p for model in (policy, value) for p in model.parameters() if p.requires_grad]
        device = self.accelerator.device
        # The fused kernel updates every parameter in one pass: on CPU 5x faster than the per-tensor
        # loop for a 26 M-parameter model (0.036 s vs 0.19 s a step with foreach), same arithmetic.
        self.optimizer = torch.optim.AdamW(
            decay_parameter_groups((policy, value), self.ppo.weight_decay),
            lr=self.ppo.learning_rate,
            eps=self.ppo.adam_epsilon,
            fused=device.type in ("cpu", "cuda"),
        )
        self.scheduler = schedule(self.optimizer)
        self._start()

    def _wrap(self, ref: nn.Module, reward: nn.Module) -> None:
        """Make `policy_wrapper`/`value_wrapper` what this backend trains through (and shard the
        frozen models into `frozen_roots` where it does)."""
        raise NotImplementedError

    def _start(self) -> None:
        """Anything that needs the optimizer and its scheduler (ZeRO's engine)."""

    # ---------------------------------------------------------------------------- rollout
    @contextmanager
    def whole(self, *models: str) -> Iterator[None]:
        """The named models (of `MODELS`) with every parameter on every process for the block, and no
        collective in their forwards, so processes may run different numbers of them (generation,
        evaluation). All processes enter and leave it together."""
        yield

    @contextmanager
    def frozen_forwards(self) -> Iterator[None]:
        """A block of forwards through `frozen_roots`, the same ones on every process."""
        yield

    # ----------------------------------------------------------------------------- training
    def train_mode(self, training: bool) -> None:
        self.policy_wrapper.train(training)
        self.value_wrapper.train(training)

    @contextmanager
    def micro_batch(self, sync: bool) -> Iterator[MicroBatch]:
        """One micro-batch's gradients, added to the others' of its mini-batch; synced across
        processes only with `sync` (the mini-batch's last)."""
        micro = MicroBatch(self)
        yield micro
        micro.close()

    def clip_gradients(self) -> torch.Tensor:
        """Clip the accumulated gradients to `ppo.max_grad_norm` (their joint norm over both models);
        returns the norm before clipping, for the trainer's finiteness check."""
        return torch.nn.utils.clip_grad_norm_(self.trainable, self.ppo.max_grad_norm)

    def step(self) -> None:
        """The mini-batch's optimizer and scheduler steps; the gradients are zeroed for the next."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -------------------------------------------------------------------------- checkpoints
    @property
    def sharding_state(self) -> dict[str, Any]:
        """What a checkpoint records of how it was trained (`workspace.check_resume` compares it)."""
        return self.plan.recorded

    @contextmanager
    def checkpoint_state(self) -> Iterator[tuple[dict | None, dict | None, Any]]:
        """(policy weights, value weights, optimizer state) for the main process to write within the
        block; None weights: the models' own. All processes enter it."""
        yield None, None, self.optimizer.state_dict()

    def load_state(self, optimizer: Any, scheduler: dict[str, Any]) -> None:
        """The optimizer state `checkpoint_state` gave (each process taking its part) and the scheduler's."""
        self._load_optimizer_state(optimizer)
        self.scheduler.load_state_dict(scheduler)

    def _load_optimizer_state(self, state: Any) -> None:
        self.optimizer.load_state_dict(state)
