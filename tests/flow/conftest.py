"""The flow against an embedded Prefect server and a temporary SQLite MLflow store, on the toy world.

Nothing here is autouse: tests ask for `flow_env` (Prefect test harness + MLflow store) explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def toy_flow_config(toy: Path, output_dir: Path, results: Path) -> dict[str, Any]:
    """Three PPO updates of 16 prompts with 16-token responses: about a minute on 2 CPU cores."""
    return {
        "output_dir": str(output_dir),
        "models": {"policy": str(toy / "policy"), "reward": str(toy / "reward")},
        "data": {"path": str(toy / "prompts.jsonl"), "max_prompt_length": 32, "eval_size": 32},
        "ppo": {
            "total_episodes": 48,
            "per_device_train_batch_size": 16,
            "num_mini_batches": 1,
            "num_ppo_epochs": 1,
            "local_rollout_forward_batch_size": 16,
            "response_length": 16,
            "stop_token": "eos",
            "missing_eos_penalty": 1.0,
            "learning_rate": 5e-5,
            "checkpoint_every": 2,
            "seed": 7,
        },
        "reward_functions": [{"path": "ppoflow.toy:oracle_score", "name": "oracle", "weight": 0.0}],
        "eval": {"batch_size": 32, "sample_table_size": 4},
        "tracking": {"experiment": "ppoflow-flow-test", "registered_model_name": "ppoflow-flow-test-policy", "system_metrics": False},
        "flow": {"retries": 2, "retry_delay_seconds": [0.0], "result_storage": str(results)},
    }


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> Iterator[str]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="session")
def flow_env(prefect_harness, mlflow_store) -> str:
    """Prefect test server and MLflow store for the session; returns the tracking URI."""
    return mlflow_store


@pytest.fixture(scope="session")
def flow_workspace(tmp_path_factory) -> Path:
    """Run workspaces and the Prefect result storage, shared by the session's flow runs."""
    return tmp_path_factory.mktemp("flow")


@pytest.fixture(scope="session")
def make_flow_config(toy_world, flow_workspace):
    """`make(name, *overrides)` -> a tiny config tree whose output_dir is `flow_workspace/name`."""
    from ppoflow.config import build_config

    def make(name: str, *overrides: str) -> dict[str, Any]:
        tree = toy_flow_config(toy_world, flow_workspace / name, flow_workspace / "prefect-results")
        return build_config(tree, overrides).model_dump(mode="json")

    return make
