"""Packing and generation-time log-probs change speed, not numbers: checked on the toy models."""

from __future__ import annotations

import json

import pytest
import torch

from ppoflow.forwards import packing_supported, response_logits, token_values
from ppoflow.models import load_causal_lm, load_classifier
from ppoflow.packing import packed_layout, padded_layout
from ppoflow.rollout import RolloutWorker, left_pad

pytestmark = pytest.mark.slow  # the toy world's models, and training on them


@pytest.fixture(scope="module")
def toy_models(toy_world):
    policy = load_causal_lm(toy_world / "policy", torch.float32).eval()
    reward = load_classifier(toy_world / "reward", torch.float32).eval()
    return policy, reward


def random_batch(rows: int = 24, prompt_width: int = 12, response_width: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randint(5, 170, (rows, prompt_width), generator=generator)
    responses = torch.randint(5, 170, (rows, response_width), generator=generator)
    prompt_lengths = torch.randint(1, prompt_width + 1, (rows,), generator=generator)
    response_lengths = torch.randint(1, response_width + 1, (rows,), generator=generator)
    query_mask = torch.arange(prompt_width)[None, :] >= prompt_width - prompt_lengths[:, None]
    response_mask = torch.arange(response_width)[None, :] < response_lengths[:, None]
    return queries.masked_fill(~query_mask, 0), query_mask, responses.masked_fill(~response_mask, 0), response_mask


def test_toy_models_pass_the_packing_self_check(toy_models):
    assert all(packing_supported(model, pad_token_id=0) for model in toy_models)


@pytest.mark.parametrize("row_tokens", [None, 16, 64])
def test_packed_forwards_match_padded_ones(toy_models, row_tokens):
    policy, reward = toy_models
    batch = random_batch()
    padded = padded_layout(*batch)
    packed = packed_layout(*batch, pad_token_id=0, row_tokens=row_tokens)
    real = int(batch[1].sum() + batch[3].sum())
    assert packed.input_ids.numel() < padded.input_ids.numel()
    assert int((packed.position_ids == 0).sum()) >= batch[0].shape[0]  # every sequence restarts at 0
    assert packed.input_ids.numel() >= real
    with torch.no_grad():
        for layout_a, layout_b in ((padded, packed),):
            logits_a = response_logits(policy, layout_a.decoder_inputs(), layout_a.before)
            logits_b = response_logits(policy, layout_b.decoder_inputs(), layout_b.before)
            assert logits_a.shape == (int(batch[3].sum()), policy.config.vocab_size)
            torch.testing.assert_close(logits_b, logits_a, atol=1e-4, rtol=1e-4)
            for index in ("before", "last"):
                values_a = token_values(reward, layout_a.decoder_inputs(), getattr(layout_a, index))
                values_b = token_values(reward, layout_b.decoder_inputs(), getattr(layout_b, index))
                torch.testing.assert_close(values_b, values_a, atol=1e-4, rtol=1e-4)


def test_generation_log_probs_match_a_fresh_forward(toy_world, toy_models):
    policy, reward = toy_models
    prompts = [json.loads(line)["prompt"] for line in (toy_world / "prompts.jsonl").read_text().splitlines()[:16]]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_world / "policy")
    queries, query_mask = left_pad([tokenizer(p)["input_ids"] for p in prompts], 0, torch.device("cpu"))
    common = dict(
        pad_token_id=0,
        stop_token_ids=[tokenizer.eos_token_id],
        completion_token_id=tokenizer.eos_token_id,
        response_length=20,
        temperature=0.7,
        chunk_size=16,
        packed=True,
    )
    worker = RolloutWorker(policy, policy, reward, reward, top_k=0, top_p=1.0, **common)
    assert worker.reuse_logprobs
    torch.manual_seed(3)
    responses, mask, recorded = worker.generate(queries, query_mask, record_logprobs=True)
    torch.manual_seed(3)
    plain, _, none = worker.generate(queries, query_mask)
    assert none is None and torch.equal(plain, responses)  # recording does not change what is sampled
    with torch.no_grad():
        fresh = worker.logprobs(policy, worker.layout(queries, query_mask, responses, mask), responses)
    assert bool(mask.any(1).all()) and recorded.shape == fresh.shape
    assert float((recorded - fresh).abs().max()) < 1e-4
    assert float(recorded[~mask].abs().max()) == 0.0
    # Filtered sampling: PPO's log-probs are of the unfiltered distribution, so they come from a forward.
    assert not RolloutWorker(policy, policy, reward, reward, top_k=20, top_p=1.0, **common).reuse_logprobs
    assert not RolloutWorker(policy, policy, reward, reward, top_k=0, top_p=0.9, **common).reuse_logprobs


def test_packed_and_padded_training_agree(run_stages, tmp_path):
    # The same first update with and without packing: identical samples (same weights and RNG), and
    # losses that agree to float tolerance (only summation order differs).
    results = {}
    for packed in (True, False):
        stages = run_stages(
            "ppo.total_episodes=8",
            f"ppo.pack_sequences={str(packed).lower()}",
            output_dir=tmp_path / f"packed-{packed}",
        )
        (results[packed],) = [
            json.loads(line) for line in (stages.plan.output_dir / "metrics.jsonl").read_text().splitlines()
        ]
    packed, padded = results[True], results[False]
    assert packed["objective/scores"] == pytest.approx(padded["objective/scores"], abs=1e-5)
    assert packed["response/length_mean"] == padded["response/length_mean"]
    for key in ("objective/kl", "loss/policy_avg", "loss/value_avg", "policy/entropy_avg", "val/ratio"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-3, abs=1e-5), key
