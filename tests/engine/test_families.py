"""Every common model family through the six stages: tiny random models of each (tests/families.py),
trained two PPO updates with and without LoRA, saved, reloaded and evaluated; plus the quirks each
family brings (role classes, pad and BOS tokens, heads, fused projections, dropout in every form)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CTRLConfig,
    CTRLForSequenceClassification,
    GenerationConfig,
)

from ppoflow.checkpoint import newest_valid_checkpoint
from ppoflow.config import PeftConfig
from ppoflow.errors import ModelError
from ppoflow.forwards import packing_supported, token_values
from ppoflow.models import add_lora, disable_dropout, load_causal_lm, load_classifier
from ppoflow.pipeline import run_all
from ppoflow.sources import describe_source
from tests.engine.conftest import toy_config
from tests.families import DROPOUT, FAMILIES, QWEN_TOKENS, build_family, build_model

pytestmark = pytest.mark.slow  # builds models from the toy world's tokenizer, and trains them

# Whether each family honours packed sequences (position ids restarting at 0, no attention mask).
# OPT's decoder builds its attention mask without the position ids, so packed sequences would attend
# across each other: its runs fall back to padded rows, with a warning.
PACKS = {name: name != "opt" for name in FAMILIES}

# The layers `peft.target_modules: all-linear` (the default) adapts: every linear layer, fused
# projections included, never the LM head.
LLAMA_STYLE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_fc", "c_proj"],  # Conv1D layers
    "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "llama": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "gemma2": LLAMA_STYLE,
    "gemma3": LLAMA_STYLE,
    "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    "opt": ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"],
}

# Families whose LM head is their input embedding (trained and saved as one tensor).
TIED = {"gpt2", "gemma2", "gemma3", "opt"}

# The pad token stage 2 settles on: the tokenizer's own, else its unk token, else EOS (GPT-2).
PAD_TOKENS = {
    "gpt2": "<|endoftext|>",
    "gpt_neox": "<unk>",
    "qwen2": "<|endoftext|>",
    "qwen3": "<|endoftext|>",
    "phi3": "<eos>",
}

PACKING_WARNING = "ignores packed position ids"


@pytest.fixture(scope="module")
def family_world(toy_world, tmp_path_factory) -> Path:
    """`WORLD/<family>/{policy,reward}` for every family and a 96-prompt slice of the toy prompts."""
    world = tmp_path_factory.mktemp("families")
    lines = (toy_world / "prompts.jsonl").read_text().splitlines(keepends=True)
    (world / "prompts.jsonl").write_text("".join(lines[:96]))
    for name in FAMILIES:
        build_family(name, toy_world, world / name)
    return world


def run_config(toy: Path, world: Path, output_dir: Path, policy: Path, reward: Path, *overrides: str):
    """Two updates of 8 prompts, one epoch of one mini-batch: each update's first forward comes before
    its optimizer step, so its PPO ratio is 1 exactly when training and rollout forwards agree."""
    return toy_config(
        toy,
        output_dir,
        f"models.policy={policy}",
        f"models.reward={reward}",
        f"data.path={world / 'prompts.jsonl'}",
        "data.eval_size=16",
        "ppo.total_episodes=16",
        "ppo.per_device_train_batch_size=8",
        "ppo.num_mini_batches=1",
        "ppo.local_rollout_forward_batch_size=8",
        "eval.batch_size=16",
        *overrides,
    )


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def assert_first_ratios_are_one(output_dir: Path) -> None:
    updates = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(updates) == 2
    for metrics in updates:
        assert metrics["val/ratio"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["policy/approxkl_avg"] < 1e-9


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_saves_reloads_and_evaluates(toy_world, family_world, family, lora, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ppoflow")
    source = family_world / family
    config = run_config(
        toy_world,
        family_world,
        tmp_path / "run",
        source / "policy",
        source / "reward",
        *(["peft.enabled=true"] if lora else []),
    )
    plan, release = run_all(config)

    assert_first_ratios_are_one(plan.output_dir)
    causal_class = AutoConfig.from_pretrained(source / "policy").architectures[0]
    assert (f"models.policy: {causal_class} {PACKING_WARNING}" in caplog.text) is not PACKS[family]
    assert (PACKING_WARNING in caplog.text) is not PACKS[family]
    assert AutoTokenizer.from_pretrained(plan.output_dir / "tokenizer").pad_token == PAD_TOKENS.get(family, "<pad>")
    assert release.eval_metrics["num_prompts"] == 16
    assert all(torch.isfinite(torch.tensor(value)) for value in release.eval_metrics.values())

    # final/ is the last checkpoint's policy, trained away from the start, and loads and generates.
    last_checkpoint, _ = newest_valid_checkpoint(plan.output_dir / "checkpoints")
    final, trained = tensors(release.policy_dir), tensors(last_checkpoint / "policy")
    assert final.keys() == trained.keys() and all(torch.equal(final[name], trained[name]) for name in final)
    if lora:
        from peft import PeftModel

        assert (release.policy_dir / "adapter_config.json").is_file()
        assert any(name.endswith("lora_B.weight") and tensor.abs().sum() > 0 for name, tensor in final.items())
        policy = PeftModel.from_pretrained(load_causal_lm(source / "policy", torch.float32), release.policy_dir)
    else:
        start = tensors(source / "policy")
        assert any(not torch.equal(final[name], start[name]) for name in final)
        config_file = json.loads((release.policy_dir / "config.json").read_text())
        assert all(config_file[name] == 0 for name in FAMILIES[family].dropout_fields)  # as the weights were trained
        policy = load_causal_lm(release.policy_dir, torch.float32)
        assert (policy.get_output_embeddings().weight is policy.get_input_embeddings().weight) is (family in TIED)
    tokenizer = AutoTokenizer.from_pretrained(release.policy_dir)
    prompt = tokenizer("the plot was great .", return_tensors="pt")
    generation = GenerationConfig.from_pretrained(release.policy_dir)
    output = policy.eval().generate(**prompt, generation_config=generation, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]


def test_policy_and_reward_of_different_families(toy_world, family_world, tmp_path, caplog):
    # A Qwen3 policy scored (and valued) by an OPT classifier on the same tokenizer: the OPT reward
    # model fails the packing self-check, so the whole run goes padded, the warning naming it.
    caplog.set_level(logging.WARNING, logger="ppoflow")
    policy = build_model("qwen3", "policy", toy_world, tmp_path / "qwen3-policy")
    reward = build_model("opt", "reward", toy_world, tmp_path / "opt-reward", tokens=QWEN_TOKENS)
    plan, release = run_all(run_config(toy_world, family_world, tmp_path / "run", policy, reward))
    assert_first_ratios_are_one(plan.output_dir)
    assert f"models.reward: OPTForSequenceClassification {PACKING_WARNING}" in caplog.text
    assert release.eval_metrics["num_prompts"] == 16
    assert json.loads((release.policy_dir / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]


def sample_ids(directory: Path) -> torch.Tensor:
    """[1, L] ids of a text under the directory's tokenizer (no padding)."""
    return AutoTokenizer.from_pretrained(directory)(
        "i just watched northern empire . in short , great", return_tensors="pt"
    )["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_training_and_eval_forwards_agree_with_every_dropout_set(family_world, family):
    # The checkpoints set every dropout-like field (GPT-2's attn_pdrop, Llama's attention_dropout,
    # OPT's layerdrop, ...) to DROPOUT; after loading, a training-mode forward must equal an eval-mode
    # one bit for bit, for the policy, the classifiers and a LoRA policy.
    policy_dir, reward_dir = family_world / family / "policy", family_world / family / "reward"
    stored = AutoConfig.from_pretrained(policy_dir)
    assert all(getattr(stored, name) == DROPOUT for name in FAMILIES[family].dropout_fields)
    ids = sample_ids(policy_dir)  # one sequence: GPT-2's classifier, without a pad token, takes no more
    lora = add_lora(load_causal_lm(policy_dir, torch.float32), PeftConfig(enabled=True))
    with torch.no_grad():
        for parameter_name, parameter in lora.named_parameters():
            if "lora_B" in parameter_name:  # nonzero, or the LoRA path adds nothing
                parameter.normal_()
    disable_dropout(lora)
    for model in (load_causal_lm(policy_dir, torch.float32), load_classifier(reward_dir, torch.float32), lora):
        torch.manual_seed(0)
        with torch.no_grad():
            training = model.train()(input_ids=ids).logits
            evaluation = model.eval()(input_ids=ids).logits
        assert torch.equal(training, evaluation), type(model).__name__


@pytest.mark.parametrize("family", FAMILIES)
def test_packing_self_check_per_family(family_world, family):
    tokenizer = AutoTokenizer.from_pretrained(family_world / family / "policy")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = load_causal_lm(family_world / family / "policy", torch.float32).eval()
    reward = load_classifier(family_world / family / "reward", torch.float32).eval()
    assert packing_supported(policy, pad) is PACKS[family]
    assert packing_supported(reward, pad) is PACKS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_targets_exist_in_every_family_and_spare_the_lm_head(family_world, family):
    policy_dir = family_world / family / "policy"
    assert PeftConfig().target_modules == "all-linear"
    loaded = add_lora(load_causal_lm(policy_dir, torch.float32), PeftConfig(enabled=True))
    with torch.device("meta"):  # stage 2 checks the targets on a skeleton like this one
        skeleton = add_lora(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy_dir)), PeftConfig(enabled=True)
        )
    for model in (loaded, skeleton):
        adapted = sorted({name.rsplit(".", 2)[-2] for name, _ in model.named_modules() if name.endswith(".lora_A")})
        assert adapted == LORA_TARGETS[family]
        assert not hasattr(model.get_output_embeddings(), "lora_A")


def test_missing_lora_targets_are_named_with_the_layers_there_are(family_world):
    gpt2 = load_causal_lm(family_world / "gpt2" / "policy", torch.float32)
    with pytest.raises(ModelError, match=r"\['q_proj', 'v_proj'\] not found.*'c_attn'"):
        add_lora(gpt2, PeftConfig(enabled=True, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_are_the_classes_the_auto_classes_load(family_world, family):
    policy_dir, reward_dir = family_world / family / "policy", family_world / family / "reward"
    causal, classifier = (
        AutoConfig.from_pretrained(policy_dir).architectures[0],
        AutoConfig.from_pretrained(reward_dir).architectures[0],
    )
    common = {"revision": None, "trust_remote_code": False}
    # GPT2LMHeadModel too
    assert describe_source("policy", "policy", str(policy_dir), classifier=False, **common).model_class == causal
    assert describe_source("reward", "reward", str(reward_dir), classifier=True, **common).model_class == classifier
    with pytest.raises(ModelError, match=f"not a causal LM.*{causal}"):
        describe_source("policy", "policy", str(reward_dir), classifier=False, **common)
    with pytest.raises(ModelError, match=f"not a sequence classifier.*{classifier}"):
        describe_source("reward", "reward", str(policy_dir), classifier=True, **common)


@pytest.mark.parametrize("family", [*FAMILIES, "ctrl"])
def test_token_values_read_the_classifier_head(family_world, family, tmp_path):
    # The reward is read through the head at the position ppoflow chooses: at a sequence's last token
    # it must be what the classifier itself outputs. GPT-2's classifier config has no pad_token_id,
    # so its own forward takes one sequence at a time; CTRL names its head `classifier`, not `score`.
    if family == "ctrl":
        CTRLForSequenceClassification(
            CTRLConfig(vocab_size=176, n_embd=32, dff=64, n_layer=1, n_head=2, num_labels=1)
        ).save_pretrained(tmp_path)
        classifier, ids = load_classifier(tmp_path, torch.float32).eval(), sample_ids(family_world / "llama" / "reward")
    else:
        classifier, ids = (
            load_classifier(family_world / family / "reward", torch.float32).eval(),
            sample_ids(family_world / family / "reward"),
        )
    if family == "gpt2":
        assert classifier.config.pad_token_id is None
    inputs = {"input_ids": ids, "attention_mask": None, "position_ids": torch.arange(ids.shape[1])[None]}
    with torch.no_grad():
        ours = token_values(classifier, inputs, torch.tensor([ids.shape[1] - 1]))
        theirs = classifier(input_ids=ids).logits[:, 0]
    torch.testing.assert_close(ours, theirs)


def test_a_classifier_without_a_linear_head_on_its_decoder_is_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=1,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no head that scores each position"):
        load_classifier(tmp_path, torch.float32)
