"""Tiny run configs on the toy world, small enough for 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppoflow.config import RunConfig, build_config


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
