"""tracking.push_to_hub: the real huggingface_hub client against a local stand-in for the Hub
(tests/hub_endpoint.py), since these machines cannot reach huggingface.co."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from ppoflow.batching import BatchPlan
from ppoflow.config import build_config
from ppoflow.errors import ConfigError, TrackingError
from ppoflow.hub import check_push, push_policy
from ppoflow.manifests import DatasetManifest, Release, RunPlan
from tests.hub_endpoint import running_hub

TOKEN = "hf_test_write_token_123"


@pytest.fixture
def hub(monkeypatch):
    with running_hub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # what HF_ENDPOINT sets at import
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield fake


@pytest.fixture
def release_inputs(tmp_path):
    tree = {
        "output_dir": str(tmp_path),
        "models": {"policy": "org/sft", "reward": "org/rm"},
        "data": {"path": "p.jsonl"},
        "tracking": {"push_to_hub": True, "hub_repo_id": "my-org/my-policy", "hub_retry_delay_seconds": [0.0, 0.0]},
    }
    config = build_config(tree)
    plan = RunPlan(
        config=config, config_hash=config.config_hash(), output_dir=tmp_path, batch=BatchPlan.derive(config.ppo)
    )
    data = DatasetManifest(
        train_dir=tmp_path / "train",
        eval_dir=tmp_path / "eval",
        fingerprint="f" * 64,
        source="p.jsonl",
        rows_read=10,
        rows_kept=10,
        dropped_too_long=0,
        dropped_empty=0,
        eos_stripped=0,
        eos_dropped=0,
        train_rows=8,
        eval_rows=2,
        train_digest="a" * 64,
        eval_digest="b" * 64,
    )
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text('{"model_type": "llama"}')
    (final / "model.safetensors").write_bytes(b"\x00weights\x01")
    (final / "README.md").write_text("peft's own card")
    release = Release(
        policy_dir=final,
        policy_sha256="c" * 64,
        eval_path=tmp_path / "eval.json",
        eval_metrics={"win_rate": 0.75},
        mlflow_run_id="run123",
        registered_model="ppoflow-policy",
        registered_version="4",
    )
    return plan, data, release


def test_push_uploads_final_with_a_lineage_card_in_one_commit(hub, release_inputs):
    plan, data, release = release_inputs
    commit = push_policy(plan, data, release)
    (made,) = hub.commits
    assert hub.repos["my-org/my-policy"]["visibility"] == "private"
    assert made.repo_id == "my-org/my-policy" and commit.commit_url.startswith(f"{hub.url}/my-org/my-policy/commit/")
    assert set(made.files) == {"config.json", "model.safetensors", "README.md"}
    assert made.files["model.safetensors"] == b"\x00weights\x01"
    card = made.files["README.md"].decode()
    for fact in ("run123", plan.config_hash, "a" * 64, "b" * 64, "f" * 64, "c" * 64, "`ppoflow-policy` version 4"):
        assert fact in card
    assert "peft's own card" not in card
    assert made.authorization == f"Bearer {TOKEN}" and TOKEN not in card
    assert "run123" in made.summary


def test_a_failing_hub_is_retried(hub, release_inputs):
    hub.fail_commits = 2
    push_policy(*release_inputs)
    assert len(hub.commits) == 1


def test_retries_follow_hub_retry_delay_seconds(hub, release_inputs):
    plan, data, release = release_inputs
    once = plan.model_copy(
        update={
            "config": plan.config.model_copy(
                update={"tracking": plan.config.tracking.model_copy(update={"hub_retry_delay_seconds": []})}
            )
        }
    )
    hub.fail_commits = 1
    with pytest.raises(TrackingError, match=r"failed 1 time \("):
        push_policy(once, data, release)
    assert hub.commits == []


def test_a_hub_that_keeps_failing_fails_in_one_line_naming_the_field(hub, release_inputs, caplog):
    hub.fail_commits = 99
    with pytest.raises(TrackingError) as failure:
        push_policy(*release_inputs)
    message = str(failure.value)
    assert "\n" not in message and message.startswith("tracking.push_to_hub:")
    assert "failed 3 times" in message and "version 4 of ppoflow-policy is kept" in message
    assert TOKEN not in message and TOKEN not in caplog.text
    assert hub.commits == []


def test_push_is_refused_up_front_offline_or_without_a_token(monkeypatch, release_inputs):
    tracking = release_inputs[0].config.tracking
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="tracking.push_to_hub.*HF_HUB_OFFLINE"):
        check_push(tracking)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(release_inputs[0].output_dir / "hf-home"))  # no saved login either
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(release_inputs[0].output_dir / "hf-home" / "token"))
    with pytest.raises(ConfigError, match="tracking.push_to_hub.*token"):
        check_push(tracking)
    check_push(tracking.model_copy(update={"push_to_hub": False}))  # off: nothing to check
