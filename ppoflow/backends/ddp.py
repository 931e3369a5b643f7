"""One process, or DDP over several: every process holds both trained models whole, and DDP
averages their gradients at the mini-batch's last micro-batch (`accelerator.no_sync` before it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

from ppoflow.backends.base import Backend, MicroBatch


class DDPBackend(Backend):
    def _wrap(self, ref: nn.Module, reward: nn.Module) -> None:
        self.policy_wrapper = self.accelerator.prepare_model(self.policy_wrapper)
        self.value_wrapper = self.accelerator.prepare_model(self.value_wrapper)

    @contextmanager
    def micro_batch(self, sync: bool) -> Iterator[MicroBatch]:
        with ExitStack() as no_sync:
            if not sync:
                for wrapper in (self.policy_wrapper, self.value_wrapper):
                    no_sync.enter_context(self.accelerator.no_sync(wrapper))
            with super().micro_batch(sync) as micro:
                yield micro
