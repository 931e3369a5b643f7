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
        "tracking": {
            "experiment": "ppoflow-flow-test",
            "registered_model_name": "ppoflow-flow-test-policy",
            "system_metrics": False,
        },
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


# ---------------------------------------------------------------------- a tiny policy and plans (no toy world)

VOCAB = ["<pad>", "<bos>", "<eos>", "<unk>", "great", "awful", "movie", "plot", "acting", ","]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """An embedded SQLite MLflow store for the module."""
    from ppoflow.tracking import default_tracking_uri

    return default_tracking_uri(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (a few thousand parameters) with a WordLevel tokenizer, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("policy")
    backend = Tokenizer(models.WordLevel(vocab={word: index for index, word in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    assert model.num_parameters() < 1_000_000
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def make_plan(tmp_path, policy_dir):
    """`build(name, **sections)` -> a RunPlan over the tiny policy, its output_dir `tmp_path/name`."""
    from ppoflow.batching import BatchPlan
    from ppoflow.config import DataConfig, ModelsConfig, PPOConfig, RunConfig, TrackingConfig
    from ppoflow.manifests import RunPlan

    def build(name: str = "job", **sections) -> RunPlan:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt": "great movie"}\n{"prompt": "awful plot"}\n')
        config = RunConfig(
            output_dir=tmp_path / name,
            models=ModelsConfig(policy=str(policy_dir), reward=str(policy_dir)),
            data=sections.pop("data", DataConfig(path=str(prompts), eval_size=1)),
            ppo=sections.pop("ppo", PPOConfig(total_episodes=16, per_device_train_batch_size=4, learning_rate=1e-5)),
            tracking=sections.pop(
                "tracking", TrackingConfig(experiment="ppoflow-test", registered_model_name="ppoflow-test")
            ),
            **sections,
        )
        return RunPlan(
            config=config,
            config_hash=config.config_hash(),
            output_dir=config.output_dir,
            batch=BatchPlan.derive(config.ppo),
        )

    return build
