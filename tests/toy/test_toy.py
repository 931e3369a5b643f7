"""The offline toy world: oracle golden values, tokenizer contract, and the built models' quality."""

import datetime
import importlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ppoflow.partitions import select_partitions
from ppoflow.toy import add_partition, build_toy, oracle_score
from ppoflow.toy.build import sample_responses
from ppoflow.toy.tokenizer import build_tokenizer
from ppoflow.toy.train import pad_right, pairwise_agreement, reward_scores
from ppoflow.toy.world import sample_completion, sample_prompts

TOY_SEED = 0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("great movie , awful plot", 0.0),
        ("the plot was great and the acting was excellent .", 2.0),
        ("i hated the battery . it arrived on time .", -1.0),
        ("great great great great", 1.0),  # a repeated word counts once
        ("Great plot, GREAT cast!", 1.0),  # case and punctuation do not matter
        ("great good excellent wonderful amazing", 3.0),  # clipped at +3
        ("awful boring dull terrible bad", -3.0),  # clipped at -3
        ("the plot was good . <eos>", 1.0),
        ("the cast was okay .", 0.0),
        ("", 0.0),
    ],
)
def test_oracle_golden_values(completion: str, expected: float) -> None:
    assert oracle_score(["any prompt"], [completion]) == [expected]


def test_oracle_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="one prompt per completion"):
        oracle_score(["a", "b"], ["great"])


def test_oracle_resolves_from_its_entry_point_name() -> None:
    module_name, function_name = "ppoflow.toy:oracle_score".split(":")
    assert getattr(importlib.import_module(module_name), function_name) is oracle_score


def test_tokenizer_special_tokens_and_round_trip() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("review of iron road : honestly ,")["input_ids"]
    special_ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special_ids == (0, 1, 2, 3)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    completion = "the plot was great , the cast was awful ."
    full = ids + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(full, skip_special_tokens=True) == f"review of iron road : honestly , {completion}"


def test_pad_right() -> None:
    assert pad_right([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]


def test_pairwise_agreement_ignores_ties_in_the_truth() -> None:
    truth = torch.tensor([1.0, 2.0, 2.0])
    assert pairwise_agreement(torch.tensor([0.1, 0.5, 0.9]), truth) == 1.0
    assert pairwise_agreement(torch.tensor([0.9, 0.5, 0.1]), truth) == 0.0
    assert pairwise_agreement(torch.tensor([0.5, 0.1, 0.9]), truth) == 0.5


def test_grammar_stays_inside_the_vocabulary_and_is_mixed() -> None:
    tokenizer, rng = build_tokenizer(), random.Random(1)
    prompts = sample_prompts(rng, 300)
    completions = [sample_completion(rng, prompt.domain) for prompt in prompts]
    encoded = tokenizer([p.text for p in prompts] + completions)["input_ids"]
    assert all(tokenizer.unk_token_id not in ids for ids in encoded)
    scores = torch.tensor(oracle_score([p.text for p in prompts], completions))
    for share in ((scores > 0).float().mean(), (scores == 0).float().mean(), (scores < 0).float().mean()):
        assert share > 0.2


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; two threads crawl when the two cores are busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def summary(toy_world: Path) -> dict:
    return json.loads((toy_world / "toy.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(toy_world: Path):
    return AutoTokenizer.from_pretrained(toy_world / "policy")


@pytest.fixture(scope="module")
def policy(toy_world: Path):
    return AutoModelForCausalLM.from_pretrained(toy_world / "policy")


@pytest.fixture(scope="module")
def reward(toy_world: Path):
    return AutoModelForSequenceClassification.from_pretrained(toy_world / "reward")


@pytest.fixture(scope="module")
def eval_prompts(toy_world: Path, summary: dict) -> list[str]:
    lines = (toy_world / "prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[-summary["prompts"]["n_eval"] :]]


@pytest.mark.slow
def test_build_is_deterministic(toy_world: Path, summary: dict, tmp_path: Path) -> None:
    again = build_toy(tmp_path, seed=TOY_SEED)
    for name in ("policy", "reward"):
        for file in sorted((toy_world / name).iterdir()):
            assert file.read_bytes() == (tmp_path / name / file.name).read_bytes(), (
                f"{name}/{file.name} differs between two builds with seed {TOY_SEED}"
                " (with PPOFLOW_TEST_TOY_DIR set, rebuild that directory from the current code)"
            )
    assert (toy_world / "prompts.jsonl").read_bytes() == (tmp_path / "prompts.jsonl").read_bytes()
    for partition in summary["partitions"]["files"]:
        assert (toy_world / partition["file"]).read_bytes() == (tmp_path / partition["file"]).read_bytes()
    assert {**again, "build_seconds": None} == {**summary, "build_seconds": None}


@pytest.mark.slow
def test_auto_classes_load_the_toy(toy_world: Path, tokenizer, policy, reward) -> None:
    reward_tokenizer = AutoTokenizer.from_pretrained(toy_world / "reward")
    assert reward_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert None not in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert type(policy).__name__ == "LlamaForCausalLM"
    assert type(reward).__name__ == "LlamaForSequenceClassification"
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tokenizer.pad_token_id
    generation = policy.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    for model in (policy, reward):
        assert 0.5e6 < model.num_parameters() < 5e6


@pytest.mark.slow
def test_prompts_file(toy_world: Path, summary: dict, tokenizer) -> None:
    prompts = [json.loads(line) for line in (toy_world / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == summary["prompts"]["n"] >= 2000
    assert all(list(row) == ["prompt"] for row in prompts)
    texts = [row["prompt"] for row in prompts]
    assert len(set(texts)) == len(texts)
    for ids in tokenizer(texts)["input_ids"]:
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.eos_token_id not in ids and tokenizer.unk_token_id not in ids


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_partitions_are_the_train_prompts_in_order(toy_world: Path, summary: dict) -> None:
    assert summary["partitions"]["files"] == [
        {"file": "prompts/prompts-2026-11-30.jsonl", "date": "2026-11-30", "n": 1372},
        {"file": "prompts/prompts-2026-12-01.jsonl", "date": "2026-12-01", "n": 1372},
    ]
    partitions = select_partitions(str(toy_world / "prompts"), None)
    assert [p.date for p in partitions] == [datetime.date(2026, 11, 30), datetime.date(2026, 12, 1)]
    lines = _texts(toy_world / "prompts.jsonl")
    assert [text for p in partitions for text in _texts(p.path)] == lines[: -summary["prompts"]["n_eval"]]


@pytest.mark.slow
def test_add_partition_writes_a_new_night_of_unseen_prompts(toy_world: Path, tmp_path: Path) -> None:
    copies = []
    for name in ("first", "second"):
        copy = tmp_path / name
        (copy / "prompts").mkdir(parents=True)
        shutil.copy(toy_world / "prompts.jsonl", copy)
        for partition in (toy_world / "prompts").glob("prompts-*.jsonl"):
            shutil.copy(partition, copy / "prompts")
        copies.append(copy)
    path = add_partition(copies[0], "2026-12-02", 40, seed=1)
    assert path == copies[0] / "prompts" / "prompts-2026-12-02.jsonl"
    assert path.read_bytes() == add_partition(copies[1], datetime.date(2026, 12, 2), 40, seed=1).read_bytes()
    new = _texts(path)
    assert len(set(new)) == 40 and not set(new) & set(_texts(toy_world / "prompts.jsonl"))
    assert [p.path.name for p in select_partitions(str(copies[0] / "prompts"), None)][-1] == path.name
    # no partial file left
    assert sorted(p.name for p in (copies[0] / "prompts").iterdir()) == [
        "prompts-2026-11-30.jsonl",
        "prompts-2026-12-01.jsonl",
        "prompts-2026-12-02.jsonl",
    ]
    with pytest.raises(FileExistsError, match="prompts-2026-12-02.jsonl"):
        add_partition(copies[0], "2026-12-02", 40, seed=2)
    assert not set(_texts(add_partition(copies[0], "2026-12-03", 40, seed=1))) & set(new)


@pytest.mark.slow
def test_reward_model_heldout_accuracy(summary: dict, tokenizer, reward) -> None:
    assert summary["reward"]["heldout_accuracy"] >= 0.9
    # Re-measured through the saved model on fresh clean pairs, finished and truncated alike.
    rng, chosen, rejected = random.Random(2024), [], []
    for prompt in sample_prompts(rng, 400):
        first, second = (_completion(rng, prompt.domain) for _ in range(2))
        first_score, second_score = oracle_score([prompt.text] * 2, [first[0], second[0]])
        if first_score != second_score:
            better, worse = (first, second) if first_score > second_score else (second, first)
            chosen.append(_ids(tokenizer, prompt.text, *better))
            rejected.append(_ids(tokenizer, prompt.text, *worse))
    assert len(chosen) > 250
    pad = tokenizer.pad_token_id
    accuracy = (reward_scores(reward, chosen, pad_id=pad) > reward_scores(reward, rejected, pad_id=pad)).float().mean()
    assert accuracy >= 0.9


def _completion(rng: random.Random, domain: str) -> tuple[str, bool]:
    """A completion's text and whether it finished; 30% are cut after a random word."""
    words = sample_completion(rng, domain).split()
    if len(words) > 1 and rng.random() < 0.3:
        return " ".join(words[: rng.randint(1, len(words) - 1)]), False
    return " ".join(words), True


def _ids(tokenizer, prompt: str, completion: str, finished: bool) -> list[int]:
    """Prompt + completion token ids as the reward model sees them, with EOS if the text finished."""
    ids = tokenizer(prompt)["input_ids"] + tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if finished else ids


@pytest.mark.slow
def test_reward_scores_are_the_same_padded_right_or_alone(tokenizer, reward) -> None:
    texts = ["review of iron road : the plot was great .", "i bought the zento lamp . the price was bad . the handle"]
    alone = torch.cat([reward(**tokenizer(text, return_tensors="pt")).logits[:, 0] for text in texts])
    padded = reward(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]
    assert tokenizer.padding_side == "right"
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sft_samples_end_with_eos_are_mixed_and_ranked_like_the_oracle(
    summary: dict, eval_prompts: list[str], tokenizer, policy, reward
) -> None:
    prompts = eval_prompts[:128]
    torch.manual_seed(0)
    responses = sample_responses(policy, tokenizer, prompts, temperature=0.7, max_new_tokens=32)
    assert sum(tokenizer.eos_token_id in response for response in responses) / len(responses) >= 0.8
    assert summary["sft_samples"]["eos_rate"] >= 0.8

    oracle = torch.tensor(oracle_score(prompts, tokenizer.batch_decode(responses, skip_special_tokens=True)))
    assert (oracle > 0).float().mean() > 0.15 and (oracle < 0).float().mean() > 0.15

    sequences = [
        prompt_ids + response for prompt_ids, response in zip(tokenizer(prompts)["input_ids"], responses, strict=True)
    ]
    scores = reward_scores(reward, sequences, pad_id=tokenizer.pad_token_id)
    assert pairwise_agreement(scores, oracle) > 0.85
    assert summary["sft_samples"]["rm_oracle_pairwise_agreement"] > 0.85
