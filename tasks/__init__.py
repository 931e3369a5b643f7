"""The six stage tasks of the flow, one module each: thin wrappers over `ppoflow.pipeline`."""

from __future__ import annotations

from ppoflow.config import FlowConfig
from ppoflow.tasks.common import flow_options
from ppoflow.tasks.configure import configure
from ppoflow.tasks.init_trainer import init_trainer
from ppoflow.tasks.load_models import load_models
from ppoflow.tasks.prepare_dataset import prepare_dataset
from ppoflow.tasks.save_and_evaluate import save_and_evaluate
from ppoflow.tasks.train_ppo import train_ppo


class Stages:
    """The six tasks with one flow run's retries, backoff and result storage (`config.flow`)."""

    def __init__(self, flow: FlowConfig):
        options = flow_options(flow)
        self.configure = configure.with_options(**options)
        self.load_models = load_models.with_options(**options)
        self.prepare_dataset = prepare_dataset.with_options(**options)
        self.init_trainer = init_trainer.with_options(**options)
        self.train_ppo = train_ppo.with_options(**options)
        self.save_and_evaluate = save_and_evaluate.with_options(**options)


__all__ = ["Stages", "configure", "init_trainer", "load_models", "prepare_dataset", "save_and_evaluate", "train_ppo"]
