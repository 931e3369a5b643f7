"""Tiny run configs on the toy world, small enough for 2 CPU cores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ppoflow.config import RunConfig, build_config

if TYPE_CHECKING:  # the engine is imported where it runs: tests/reliability imports `toy_config` alone
    from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, RunPlan
    from ppoflow.trainer import PPOTrainer


def toy_config(toy: Path, output_dir: Path, *overrides: str) -> RunConfig:
    """A fast config: 16-prompt batches, short responses. Overrides are `key.path=value`."""
    tree = {
        "output_dir": str(output_dir),
        "models": {"policy": str(toy / "policy"), "reward": str(toy / "reward")},
        "data": {"path": str(toy / "prompts.jsonl"), "max_prompt_length": 32, "eval_size": 32},
        "ppo": {
            "total_episodes": 32,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "num_mini_batches": 2,
            "num_ppo_epochs": 1,
            "local_rollout_forward_batch_size": 16,
            "response_length": 16,
            "stop_token": "eos",
            "missing_eos_penalty": 1.0,
            "learning_rate": 5e-5,
            "checkpoint_every": 1,
            "seed": 7,
        },
        "reward_functions": [{"path": "ppoflow.toy:oracle_score", "name": "oracle", "weight": 0.0}],
        "eval": {"batch_size": 32, "sample_table_size": 4},
    }
    return build_config(tree, overrides)


@pytest.fixture
def make_config(toy_world, tmp_path):
    def make(*overrides: str, output_dir: Path | None = None) -> RunConfig:
        return toy_config(toy_world, output_dir or tmp_path / "run", *overrides)

    return make


@dataclass(frozen=True)
class Stages:
    """What the stages of `pipeline.run_all` returned for one config, run in this process."""

    plan: RunPlan
    models: ModelManifest
    data: DatasetManifest
    start: CheckpointManifest  # stage 4: the step-0 checkpoint
    final: CheckpointManifest | None  # stage 5: the last checkpoint (None: not trained)

    def trainer(self) -> PPOTrainer:
        """A trainer at the step-0 checkpoint, as stage 5 builds it."""
        from ppoflow.trainer import PPOTrainer

        return PPOTrainer.from_checkpoint(self.plan, self.models, self.data, self.start.path)


@pytest.fixture
def run_stages(make_config):
    """`run_stages(*overrides, output_dir=None, train=True) -> Stages`: a toy config through stages 1-4
    and, unless `train=False`, stage 5 (training); no evaluation."""
    from ppoflow import pipeline

    def run(*overrides: str, output_dir: Path | None = None, train: bool = True) -> Stages:
        plan = pipeline.configure(make_config(*overrides, output_dir=output_dir))
        models = pipeline.load_models(plan)
        data = pipeline.prepare_dataset(plan, models)
        start = pipeline.init_trainer(plan, models, data)
        final = pipeline.train(plan, models, data) if train else None
        return Stages(plan, models, data, start, final)

    return run


@pytest.fixture(scope="session")
def unsharded_run(toy_world, tmp_path_factory) -> Path:
    """tests/engine/launching.py's training with plain DDP: what the sharded runs are compared with."""
    from tests.engine.launching import run

    return run(toy_world, tmp_path_factory.mktemp("ddp"), "unsharded")
