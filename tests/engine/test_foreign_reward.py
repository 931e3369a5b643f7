"""A reward model with its own tokenizer, on the toy world: the toy reward model re-indexed under a
permuted tokenizer (tests/foreign_reward.py) is the same function of text, so scoring through
re-encoded text must give the scores of the shared-tokenizer path, and a run with it trains."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from ppoflow import pipeline
from ppoflow.errors import ModelError
from ppoflow.rollout import left_pad
from tests.foreign_reward import build_permuted_reward

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def permuted_reward(toy_world, tmp_path_factory):
    return build_permuted_reward(toy_world, tmp_path_factory.mktemp("permuted") / "reward")


@pytest.mark.parametrize("pack", ["true", "false"])
def test_re_encoded_scores_equal_the_shared_tokenizer_scores(run_stages, permuted_reward, tmp_path, pack):
    shared = run_stages(f"ppo.pack_sequences={pack}", output_dir=tmp_path / "shared", train=False).trainer()
    foreign = run_stages(
        f"models.reward={permuted_reward}", f"ppo.pack_sequences={pack}", output_dir=tmp_path / "foreign", train=False
    ).trainer()
    assert shared.models.reward_tokenizer_dir is None
    assert foreign.models.reward_tokenizer_dir is not None and foreign.models.is_intact()
    assert foreign.worker.reward_encoder is not None and foreign.worker.reward_packed == (pack == "true")

    prompts = shared.train_rows.select(range(24))["input_ids"]
    queries, query_mask = left_pad(prompts, shared.models.pad_token_id, torch.device("cpu"))
    torch.manual_seed(0)
    responses, mask, _ = shared.worker.generate(queries, query_mask)
    layout = shared.worker.layout(queries, query_mask, responses, mask)
    with torch.no_grad():
        expected = shared.worker.end_scores(layout, queries, query_mask, responses, mask, None)
        actual = foreign.worker.end_scores(layout, queries, query_mask, responses, mask, None)
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()


def test_a_run_with_a_foreign_reward_model_trains_with_the_value_model_from_the_policy(
    make_config, permuted_reward, caplog
):
    caplog.set_level(logging.INFO, logger="ppoflow")
    config = make_config(
        f"models.reward={permuted_reward}",
        "ppo.total_episodes=16",
        "data.eval_size=16",
        "eval.batch_size=16",
        "ppo.eval_every=1",
    )
    plan, release = pipeline.run_all(config)
    assert "the value model starts from the policy checkpoint" in caplog.text
    metrics = [json.loads(line) for line in (plan.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in metrics] == [1, 2]
    assert all(abs(m["objective/scores"]) < 50 for m in metrics)
    # step 0's value model is the policy's decoder with a new scalar head
    step_zero = load_file(plan.output_dir / "checkpoints" / "step-000000" / "value" / "model.safetensors")
    policy = load_file(config.models.policy + "/model.safetensors")
    assert torch.equal(step_zero["model.embed_tokens.weight"], policy["model.embed_tokens.weight"])
    assert step_zero["score.weight"].shape == (1, policy["model.embed_tokens.weight"].shape[1])
    assert {"reward_policy", "reward_ref", "win_rate"} <= set(release.eval_metrics)
    # evaluated after each update, scored on the re-encoded text as stage 6 scores it
    assert {f"eval/{key}": value for key, value in release.eval_metrics.items()}.items() <= metrics[-1].items()
    assert 0.0 <= metrics[0]["eval/win_rate"] <= 1.0
    assert (plan.output_dir / "reward_tokenizer" / "tokenizer.json").is_file()


def test_a_value_model_with_another_tokenizer_is_refused_in_stage_2(make_config, permuted_reward):
    config = make_config(f"models.reward={permuted_reward}", f"models.value={permuted_reward}")
    plan = pipeline.configure(config)
    with pytest.raises(ModelError, match=r"^models\.value: .*another tokenizer than the policy") as refused:
        pipeline.load_models(plan)
    assert "\n" not in str(refused.value)


def test_the_value_model_may_start_from_a_causal_lm(run_stages, toy_world):
    # TRL allows the SFT model as the value start: the decoder with a fresh scalar head
    trainer = run_stages(
        f"models.value={toy_world / 'policy'}",
        "ppo.total_episodes=8",
        "ppo.per_device_train_batch_size=8",
        "ppo.num_mini_batches=1",
        train=False,
    ).trainer()
    assert trainer.models.value.model_class.endswith("ForCausalLM")
    assert type(trainer.value).__name__.endswith("ForSequenceClassification")
    trainer.train()
