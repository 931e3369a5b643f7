"""Registry model sources and the promotion gate, against a real embedded SQLite MLflow store.

Versions are registered the two ways users have: through `log_release` (a logged transformers
model: weights in `model/`, tokenizer in `components/tokenizer/`) and from a plain model directory
logged as run artifacts. The gate's head-to-head evaluation is the one piece replaced here (a
function returning fixed numbers, recording what it was asked to compare): the flow tests run it
for real on the toy world.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ppoflow.config import PromotionConfig
from ppoflow.errors import ConfigError, ModelError
from ppoflow.manifests import Release
from ppoflow.preflight import check_model_source
from ppoflow.tracking import log_release, open_run
from ppoflow.tracking.promotion import alias_holder, decide, gate
from ppoflow.tracking.registry import FETCHED, fetch, resolve

pytestmark = pytest.mark.flow

NAME = "gate-test-policy"
TRAINING = "t" * 64  # a training fingerprint (`manifests.training_fingerprint`)
EVAL = {"reward_policy": 1.5, "reward_ref": 0.5, "win_rate": 0.75, "kl": 2.0, "eos_rate": 1.0, "oracle_policy": 0.8}


@pytest.fixture(scope="module")
def registry(store, policy_dir, tmp_path_factory):
    """Version 1 through log_release, versions 2 and 3 from a plain directory; returns the run of v1."""
    from ppoflow.batching import BatchPlan
    from ppoflow.config import DataConfig, ModelsConfig, PPOConfig, RunConfig, TrackingConfig
    from ppoflow.manifests import RunPlan

    base = tmp_path_factory.mktemp("registry")
    prompts = base / "prompts.jsonl"
    prompts.write_text('{"prompt": "great movie"}\n')
    config = RunConfig(
        output_dir=base / "v1",
        models=ModelsConfig(policy=str(policy_dir), reward=str(policy_dir)),
        data=DataConfig(path=str(prompts)),
        ppo=PPOConfig(total_episodes=4, per_device_train_batch_size=4),
        tracking=TrackingConfig(experiment="gate-test", registered_model_name=NAME),
    )
    plan = RunPlan(
        config=config,
        config_hash=config.config_hash(),
        output_dir=config.output_dir,
        batch=BatchPlan.derive(config.ppo),
    )
    run = open_run(plan, TRAINING, tracking_uri=store)
    release = Release(policy_dir=policy_dir, policy_sha256="1" * 64, eval_path=base / "eval.json", eval_metrics=EVAL)
    log_release(
        run,
        release,
        samples=pd.DataFrame({"prompt": ["p"]}),
        metrics_history=[],
        eval_report=EVAL,
        policy_dir=policy_dir,
        registered_model_name=NAME,
        alias="candidate",
        log_model=True,
        policy_source=str(policy_dir),
    )
    for _ in (2, 3):
        run.client.log_artifacts(run.run_id, str(policy_dir), "plain")
        run.client.create_model_version(
            NAME, source=f"{run.client.get_run(run.run_id).info.artifact_uri}/plain", run_id=run.run_id
        )
    return run


def test_the_gate_decides_from_its_bounds_in_one_readable_line():
    promotion = PromotionConfig(min_win_rate=0.55, max_kl=3.0, min_reward_functions={"oracle": 0.5})
    decided = decide(promotion, "models:/p/1", {"win_rate": 0.6, "reward_policy": 1.0, "reward_ref": 0.4}, EVAL)
    assert decided["promoted"] is True
    assert (
        decided["decision"]
        == "promoted: win rate 0.6 >= 0.55; KL to the reference 2 <= 3; oracle mean 0.8 >= 0.5 against models:/p/1"
    )
    assert decided["reward_against"] == 0.4 and decided["bounds"]["win rate"] == {
        "value": 0.6,
        "bound": 0.55,
        "passed": True,
    }

    # only the bounds that failed are named
    losing = decide(
        promotion, "models:/p/1", {"win_rate": 0.5, "reward_policy": 1.0, "reward_ref": 1.2}, {**EVAL, "kl": 3.5}
    )
    assert losing["promoted"] is False
    assert losing["decision"] == "rejected: win rate 0.5 < 0.55; KL to the reference 3.5 > 3 against models:/p/1"
    # the bound is inclusive
    assert decide(PromotionConfig(), "the reference", {**EVAL, "win_rate": 0.55}, EVAL)["promoted"] is True


def test_registry_uris_resolve_to_one_version_fetched_once_as_a_model_directory(store, registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    check_model_source("models.policy", f"models:/{NAME}@candidate")
    with pytest.raises(ConfigError, match=r"models\.policy.*models:/NAME@ALIAS"):
        check_model_source("models.policy", f"models:/{NAME}@")

    version = resolve("models.policy", f"models:/{NAME}@candidate")
    assert (version.name, version.version, version.uri) == (NAME, "1", f"models:/{NAME}/1")
    # a logged transformers model: weights and tokenizer side by side
    logged = fetch("models.policy", version, tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json", FETCHED} <= {path.name for path in logged.iterdir()}
    assert (logged / FETCHED).read_text() == f"models:/{NAME}/1"
    stamp = (logged / "config.json").stat().st_mtime_ns
    # once
    assert fetch("models.policy", version, tmp_path) == logged and (logged / "config.json").stat().st_mtime_ns == stamp

    # a directory logged as artifacts
    plain = fetch("models.reward", resolve("models.reward", f"models:/{NAME}/2"), tmp_path)
    assert (plain / "config.json").is_file() and (plain / "tokenizer.json").is_file()

    # the first run of a chain: an alias that points nowhere yet falls back to models.policy_fallback
    from ppoflow.config import ModelsConfig
    from ppoflow.sources import pin_registry_sources

    chained = ModelsConfig(policy=f"models:/{NAME}@nobody", policy_fallback="/sft", reward=f"models:/{NAME}/2")
    pinned_config, pinned = pin_registry_sources(chained, tmp_path)
    assert (pinned_config.policy, pinned_config.reward) == ("/sft", str(plain))
    assert pinned == {plain: (f"models:/{NAME}/2", f"models:/{NAME}/2")}
    with pytest.raises(ConfigError, match="models.policy_fallback"):
        from ppoflow.config import RunConfig
        from ppoflow.preflight import validate_sources

        validate_sources(
            RunConfig(
                models={"policy": str(plain), "policy_fallback": str(plain), "reward": str(plain)},
                data={"path": str(tmp_path)},
            )
        )

    for uri, missing in (
        (f"models:/{NAME}@champion", "alias 'champion'"),
        (f"models:/{NAME}/9", "version 9"),
        ("models:/nobody/1", "version 1"),
    ):
        with pytest.raises(ModelError, match=rf"^models\.value: {uri} does not resolve: no {missing}") as caught:
            resolve("models.value", uri)
        assert "\n" not in str(caught.value)


def test_the_gate_promotes_rejects_and_re_evaluates_when_another_run_moves_the_alias(registry, tmp_path):
    run, promotion = registry, PromotionConfig(alias="champion")
    asked: list[str] = []

    def evaluate(baseline_dir: Path) -> dict[str, float]:
        asked.append((baseline_dir / FETCHED).read_text())
        return {"win_rate": 0.7, "reward_policy": 1.0, "reward_ref": 0.5}

    arguments = dict(evaluate=evaluate, fetch_root=tmp_path, eval_metrics=EVAL)
    # no holder yet: the stage's own eval against the reference decides, nothing else is evaluated
    first = gate(run, promotion, name=NAME, version="1", **arguments)
    assert first["promoted"] and first["against"] == "the reference" and asked == []
    assert alias_holder(run, NAME, "champion") == "1"
    tags = run.client.get_model_version(NAME, "1").tags
    assert tags["ppoflow.promotion"] == "promoted: win rate 0.75 >= 0.55 against the reference"
    assert json.loads(tags["ppoflow.promotion.detail"]) == first
    assert run.client.get_run(run.run_id).data.tags["ppoflow.promotion"] == first["decision"]

    # version 3 is set by "another run" while version 2 is being compared with version 1: 2 is compared again, with 3
    def racing(baseline_dir: Path) -> dict[str, float]:
        if not asked:
            run.client.set_registered_model_alias(NAME, "champion", "3")
        return evaluate(baseline_dir)

    second = gate(run, promotion, name=NAME, version="2", **{**arguments, "evaluate": racing})
    assert asked == [f"models:/{NAME}/1", f"models:/{NAME}/3"]
    assert (
        second["promoted"] and second["against"] == f"models:/{NAME}/3" and alias_holder(run, NAME, "champion") == "2"
    )

    # a version that loses leaves the alias where it was; a retried stage does not decide again
    asked.clear()
    losing = gate(
        run,
        promotion,
        name=NAME,
        version="3",
        **{**arguments, "evaluate": lambda _: {"win_rate": 0.2, "reward_policy": 0.1, "reward_ref": 0.9}},
    )
    assert not losing["promoted"] and losing["decision"] == f"rejected: win rate 0.2 < 0.55 against models:/{NAME}/2"
    assert alias_holder(run, NAME, "champion") == "2"
    assert gate(run, promotion, name=NAME, version="3", **arguments) == losing and asked == []


def test_runs_from_the_registry_are_named_after_the_registered_model():
    from ppoflow.config import RunConfig
    from ppoflow.tracking import run_name

    def named(policy: str) -> str:
        return run_name(RunConfig(models={"policy": policy, "reward": "/r"}, data={"path": "/p"}), "0123456789abcdef")

    assert named("models:/team-policy@champion") == "team-policy@champion-01234567"
    assert named("models:/team-policy/12") == "team-policy-v12-01234567"
    assert named("/models/sft/") == "sft-01234567"
