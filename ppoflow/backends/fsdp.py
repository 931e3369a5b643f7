"""FULL_SHARD training (`runtime.fsdp`, or an accelerate config with `distributed_type: FSDP`)
with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

The policy and the value model are sharded: each decoder layer (the classes a transformers model
names in `_no_split_modules`) is its own group, all-gathered just before its forward and freed
after it, and the root (the `AtResponseTokens` wrapper) holds the rest (embeddings, final norm,
heads). With `runtime.fsdp_frozen` the reference and the reward model are sharded too, and their
forwards gather one layer at a time, the same forwards on every process. accelerate still forms
the process group; its own FSDP plugin is not used: it gives DDP on CPU and takes one model only.

Rollout and evaluation call the inner Hugging Face models directly, a different number of forwards
on each process (responses end at different lengths): they run inside `whole`, where every
parameter stays whole and no collective is issued. Checkpoints hold full (unsharded) state dicts,
gathered by every process and written by the main one, so their format is that of a DDP run; the
optimizer state is keyed by parameter name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ppoflow.backends.base import MODELS, AtResponseTokens, Backend, MicroBatch
from ppoflow.errors import ModelError
from ppoflow.forwards import response_logits, token_values

log = logging.getLogger(__name__)

# Whole tensors in CPU memory, on the main process only (the others get empty dicts).
FULL_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)


def decoder_layer_classes(module: nn.Module) -> set[str]:
    """The class names transformers keeps whole (`_no_split_modules`: the decoder layers)."""
    return {name for sub in module.modules() for name in (getattr(sub, "_no_split_modules", None) or ())}


def shard(module: nn.Module, *, frozen: bool = False, layer_classes: Iterable[str] | None = None) -> nn.Module:
    """Shard `module` in place, FULL_SHARD: each decoder layer, then the root (the rest).

    `frozen` (a model that only runs no-grad forwards: the reference, the reward model): the root
    too is freed after each forward, which FSDP keeps whole by default for the backward to come.
    `layer_classes`: the class names of the layers to shard apart (an accelerate config's
    `fsdp_transformer_layer_cls_to_wrap`), instead of the model's `_no_split_modules`."""
    if layer_classes is not None:
        classes = set(layer_classes)
        missing = sorted(classes - {type(sub).__name__ for sub in module.modules()})
        if missing:
            model = type(getattr(module, "model", module)).__name__
            raise ModelError(
                f"runtime.accelerate_config: fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, "
                f"which {model} has not — name its decoder layer class "
                f"({', '.join(sorted(decoder_layer_classes(module))) or 'see its modules'}) or leave the key out"
            )
    else:
        classes = decoder_layer_classes(module)
    layers = [sub for sub in module.modules() if type(sub).__name__ in classes]
    if not layers:
        log.warning("%s names no decoder layer class (_no_split_modules): sharded as one group", type(module).__name__)
    for layer in layers:
        fully_shard(layer)
    fully_shard(module)
    # FSDP2 takes the first sharded module to run a forward as the root. Rollout runs the inner
    # model's layers directly: make `module` the root now, before any forward.
    module._get_fsdp_state()._lazy_init()
    if frozen:
        module.set_reshard_after_forward(True, recurse=False)
    return module


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def is_frozen(module: nn.Module) -> bool:
    return not any(parameter.requires_grad for parameter in module.parameters())


@contextmanager
def sharded_forwards(*roots: nn.Module) -> Iterator[None]:
    """A block of no-grad forwards through the sharded frozen `roots` (each all-gathers its groups
    one at a time, so every process runs the same forwards in the same order). FSDP2 records each
    forward for the backward prefetch order, and a frozen model has no backward to clear it: it is
    cleared here."""
    try:
        yield
    finally:
        for root in roots:
            if is_sharded(root):
                root.reset_iter_state()


@contextmanager
def gathered(*roots: nn.Module) -> Iterator[None]:
    """Every parameter of the sharded `roots` whole for the block (modules not sharded are left
    alone). Entering and leaving are collectives (all processes, same roots); inside, forwards issue
    none, so processes may run different numbers of them."""
    sharded = [root for root in roots if is_sharded(root)]
    groups = [sub for root in sharded for sub in root.modules() if isinstance(sub, FSDPModule)]
    for root in sharded:
        root.set_reshard_after_forward(False, recurse=True)
    for group in groups:
        group.unshard()
    try:
        yield
    finally:
        for group in groups:
            group.reshard()
        # FSDP2 records every forward (no-grad ones too) to order its backward prefetches: forget
        # these, a different number on each process, or the next backward's all-gathers mismatch.
        for root in sharded:
            root.reset_iter_state()
        # The roots keep FSDP's default for a root: not resharded after forward (backward needs them),
        # but for a frozen root (`shard(frozen=True)`).
        for group in groups:
            if not any(group is root for root in sharded) or is_frozen(group):
                group.set_reshard_after_forward(True, recurse=False)


def set_gradient_sync(roots: list[nn.Module], sync: bool) -> None:
    """FSDP2's `no_sync`: without sync, gradients accumulate unsharded and are reduce-scattered at
    the next backward with sync."""
    for root in roots:
        root.set_requires_gradient_sync(sync)


def held_parameters(module: nn.Module) -> tuple[int, int]:
    """(parameters this process holds, parameters of the model): its shards of a sharded module."""
    held = total = 0
    for parameter in module.parameters():
        held += parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
        total += parameter.numel()
    return held, total


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective); any other tensor as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_model_state(root: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The full state dict of a sharded `root` on the main process (empty on the others), keys
    without `prefix` (the wrapper's attribute path to the Hugging Face model). All processes call it.

    A tied weight (an LM head sharing the input embedding) is kept under its first name only, as
    `save_pretrained` writes an unsharded model: gathered, the two names hold separate copies,
    which it would no longer recognise as one."""
    first_names: dict[int, str] = {}
    for key, value in root.state_dict(keep_vars=True).items():
        first_names.setdefault(id(value), key)
    kept = set(first_names.values())
    state = get_model_state_dict(root, options=FULL_ON_MAIN)
    return {key.removeprefix(prefix): value for key, value in state.items() if key in kept}


def full_optimizer_state(container: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state, keyed by parameter name, on the main process. All processes call it.

    A fresh optimizer (no step yet) is saved as it is: torch's helper would first create its state
    with a zero-gradient step, which AdamW counts, changing the bias correction of every later step."""
    if not optimizer.state:
        return optimizer.state_dict()
    return get_optimizer_state_dict(container, optimizer, options=FULL_ON_MAIN)


def load_full_optimizer_state(container: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what `full_optimizer_state` saved, every process taking its shards from the full state."""
    if not state["state"]:
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(container, optimizer, state, options=StateDictOptions(full_state_dict=True))


class FSDPBackend(Backend):
    def _wrap(self, ref: nn.Module, reward: nn.Module) -> None:
        # Every process loaded the full weights; each keeps its shards.
        classes = self.plan.layer_classes
        self.policy_wrapper = shard(self.policy_wrapper, layer_classes=classes)
        self.value_wrapper = shard(self.value_wrapper, layer_classes=classes)
        # One optimizer spans both models: its full state is keyed by names under this container.
        self.sharded = nn.ModuleDict({"policy": self.policy_wrapper, "value": self.value_wrapper})
        if self.plan.frozen:
            self.frozen_roots = [
                shard(AtResponseTokens(model, read), frozen=True, layer_classes=classes)
                for model, read in ((ref, response_logits), (reward, token_values))
            ]
        self.roots = dict(zip(MODELS, (self.policy_wrapper, self.value_wrapper, *self.frozen_roots), strict=False))
        for name, root in self.roots.items():
            held, total = held_parameters(root)
            log.info(
                "fsdp: %s: %d of its %d parameters held by process %d",
                name,
                held,
                total,
                self.accelerator.process_index,
            )

    @contextmanager
    def whole(self, *models: str) -> Iterator[None]:
        with gathered(*(self.roots[name] for name in models if name in self.roots)):
            yield

    def frozen_forwards(self):
        return sharded_forwards(*self.frozen_roots)

    @contextmanager
    def micro_batch(self, sync: bool) -> Iterator[MicroBatch]:
        set_gradient_sync([self.policy_wrapper, self.value_wrapper], sync)
        with super().micro_batch(sync) as micro:
            yield micro

    def clip_gradients(self) -> torch.Tensor:
        return full_value(super().clip_gradients())

    @contextmanager
    def checkpoint_state(self) -> Iterator[tuple[dict | None, dict | None, Any]]:
        # Every process gathers; the main one receives the full states.
        yield (
            full_model_state(self.policy_wrapper, prefix="model."),
            full_model_state(self.value_wrapper, prefix="model."),
            full_optimizer_state(self.sharded, self.optimizer),
        )

    def _load_optimizer_state(self, state: Any) -> None:
        load_full_optimizer_state(self.sharded, self.optimizer, state)
