"""Build the offline toy RLHF world: tokenizer, SFT policy, reward model, prompts and a summary.

Layout of `out_dir`:
  policy/         LlamaForCausalLM + tokenizer + generation_config (the SFT checkpoint)
  reward/         LlamaForSequenceClassification (num_labels=1) + the same tokenizer
  prompts.jsonl   {"prompt": ...} a line; the last `n_eval_prompts` lines are the eval split
  prompts/        the train prompts of prompts.jsonl (all lines but the eval split), in order, cut
                  in dated partitions `prompts-2026-11-30.jsonl`, `prompts-2026-12-01.jsonl` (a
                  partitioned data.path); `add_partition` writes a further night of new prompts
  toy.json        what was built and how good it is (the dict `build_toy` returns)

Everything derives from `seed`: data from `random.Random(seed)`, weights from torch seeded the same
way, with deterministic kernels and a fixed thread count, so two builds with the same seed write
byte-identical weight files on the same machine and library versions.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from ppoflow.toy.tokenizer import build_tokenizer
from ppoflow.toy.train import pairwise_accuracy, pairwise_agreement, reward_scores, train_reward, train_sft
from ppoflow.toy.world import Prompt, all_prompts, oracle_score, sample_completion, sample_prompts

logger = logging.getLogger(__name__)

MODEL_SHAPE = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}
SFT_TRAINING = {"epochs": 1, "batch_size": 32, "lr": 3e-3}
REWARD_TRAINING = {"epochs": 1, "batch_size": 16, "lr": 1e-3}
TRUNCATED_FRACTION = 0.3
SAMPLE_TEMPERATURE = 0.7
SAMPLE_MAX_NEW_TOKENS = 32
N_SUMMARY_EXAMPLES = 3
PARTITIONS_DIR = "prompts"
PARTITION_DATES = (datetime.date(2026, 11, 30), datetime.date(2026, 12, 1))


def build_toy(
    out_dir: Path,
    seed: int = 0,
    *,
    n_prompts: int = 3000,
    n_eval_prompts: int = 256,
    n_sft_examples: int = 5000,
    n_reward_pairs: int = 3500,
    n_heldout_pairs: int = 500,
    label_noise: float = 0.07,
    n_samples: int = 256,
    num_threads: int = 1,
) -> dict:
    """Build the toy world into `out_dir` and return its summary (also written to `toy.json`).

    The last `n_eval_prompts` lines of `prompts.jsonl` are the eval split, held out from SFT and
    reward-model training. The policy sees `n_sft_examples` prompt+completion texts once; the
    reward model sees `n_reward_pairs` preference pairs once, labelled by `oracle_score` with a
    `label_noise` fraction flipped, and is measured on `n_heldout_pairs` clean pairs over the eval
    prompts. `n_samples` SFT samples (temperature 0.7, at most 32 new tokens) on eval prompts give
    the EOS rate and how well the reward model agrees with the oracle. Torch runs on `num_threads`
    threads during the build (restored after): kernel results may depend on the thread count, and
    one thread is also the fastest for these tiny matrices on a busy two-core machine.
    """
    if not 0 < n_eval_prompts < n_prompts:
        raise ValueError(f"n_eval_prompts={n_eval_prompts} must be between 1 and n_prompts - 1 = {n_prompts - 1}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    prompts = sample_prompts(rng, n_prompts)
    train_prompts, eval_prompts = prompts[:-n_eval_prompts], prompts[-n_eval_prompts:]
    write_prompts(out_dir / "prompts.jsonl", [prompt.text for prompt in prompts])
    partitions = write_partitions(out_dir / PARTITIONS_DIR, [prompt.text for prompt in train_prompts])

    with deterministic_torch(seed, num_threads):
        generator = torch.Generator().manual_seed(seed)
        policy = LlamaForCausalLM(_model_config(tokenizer))
        sft_examples = [_sft_example(tokenizer, rng.choice(train_prompts), rng) for _ in range(n_sft_examples)]
        sft_loss = train_sft(policy, sft_examples, pad_id=tokenizer.pad_token_id, generator=generator, **SFT_TRAINING)
        _save(policy, tokenizer, out_dir / "policy")
        logger.info("toy: policy trained (SFT loss %.3f) after %.1f s", sft_loss, time.perf_counter() - started)

        reward = LlamaForSequenceClassification(_model_config(tokenizer, num_labels=1))
        train_pairs = [_pair(tokenizer, rng.choice(train_prompts), rng, label_noise) for _ in range(n_reward_pairs)]
        heldout_pairs = [_pair(tokenizer, rng.choice(eval_prompts), rng, 0.0) for _ in range(n_heldout_pairs)]
        reward_loss = train_reward(
            reward, train_pairs, pad_id=tokenizer.pad_token_id, generator=generator, **REWARD_TRAINING
        )
        _save(reward, tokenizer, out_dir / "reward")
        accuracy = pairwise_accuracy(reward, heldout_pairs, pad_id=tokenizer.pad_token_id)
        elapsed = time.perf_counter() - started
        logger.info("toy: reward model trained (held-out accuracy %.3f) after %.1f s", accuracy, elapsed)

        sample_prompts_text = [eval_prompts[index % n_eval_prompts].text for index in range(n_samples)]
        samples = _sample_report(policy, reward, tokenizer, sample_prompts_text)

    summary = {
        "seed": seed,
        "prompts": {
            "file": "prompts.jsonl",
            "n": n_prompts,
            "n_eval": n_eval_prompts,
            "eval_split": "the last n_eval lines",
        },
        "partitions": {
            "dir": PARTITIONS_DIR,
            "files": partitions,
            "from": "the train prompts of prompts.jsonl (all but the last n_eval lines), in order",
        },
        "tokenizer": _tokenizer_facts(tokenizer),
        "model_shape": MODEL_SHAPE,
        "policy": {
            "dir": "policy",
            "parameters": policy.num_parameters(),
            "sft_examples": n_sft_examples,
            "sft_final_loss": sft_loss,
            **SFT_TRAINING,
        },
        "reward": {
            "dir": "reward",
            "parameters": reward.num_parameters(),
            "train_pairs": n_reward_pairs,
            "label_noise": label_noise,
            "final_loss": reward_loss,
            "heldout_pairs": n_heldout_pairs,
            "heldout_accuracy": accuracy,
            "padding": "right: the score is read at the last non-pad token (EOS, or the last word if truncated)",
            **REWARD_TRAINING,
        },
        "sft_samples": samples,
        "num_threads": num_threads,
        "build_seconds": round(time.perf_counter() - started, 2),
        "versions": _versions(),
    }
    (out_dir / "toy.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("toy: built %s in %.1f s", out_dir, summary["build_seconds"])
    return summary


def add_partition(toy_dir: Path, date: datetime.date | str, n: int, seed: int = 0) -> Path:
    """Write `toy_dir/prompts/prompts-DATE.jsonl`: `n` toy prompts that no prompts file of the toy
    holds yet, drawn with `seed` — a night's new data arriving, for a nightly run to find.

    The file appears whole (written under a hidden name, then renamed) and never replaces an
    existing partition. `toy.json` is left as it is: it describes the build.
    """
    date = datetime.date.fromisoformat(str(date))
    directory = Path(toy_dir) / PARTITIONS_DIR
    path = directory / partition_name(date)
    if path.exists():
        raise FileExistsError(f"{path} exists: a partition is written once (choose another date)")
    known = {
        json.loads(line)["prompt"]
        for file in [Path(toy_dir) / "prompts.jsonl", *sorted(directory.glob("prompts-*.jsonl"))]
        for line in file.read_text().splitlines()
    }
    fresh = [prompt for prompt in all_prompts() if prompt.text not in known]
    if not 0 < n <= len(fresh):
        raise ValueError(f"n={n} is out of range: the toy grammar has {len(fresh)} prompts no partition holds yet")
    partial = directory / f".{path.name}.partial"
    write_prompts(partial, [prompt.text for prompt in random.Random(seed).sample(fresh, n)])
    os.replace(partial, path)
    return path


def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    *,
    temperature: float = SAMPLE_TEMPERATURE,
    max_new_tokens: int = SAMPLE_MAX_NEW_TOKENS,
) -> list[list[int]]:
    """Sampled response ids per prompt (plain temperature sampling), cut after the first EOS.

    Prompts are left-padded for generation. Uses torch's global RNG: seed it for repeatable samples.
    """
    batch = tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        sequences = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    responses = []
    for row in sequences[:, batch["input_ids"].shape[1] :].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        responses.append(row[:end])
    return responses


@contextmanager
def deterministic_torch(seed: int, num_threads: int) -> Iterator[None]:
    """Seed torch, use deterministic kernels and `num_threads`; restore all of it afterwards."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
        torch.set_num_threads(previous_threads)


def write_prompts(path: Path, prompts: Sequence[object]) -> None:
    """`{"prompt": ...}` a line: a text, or a conversation (a list of messages)."""
    with path.open("w") as handle:
        handle.writelines(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts)


def partition_name(date: datetime.date) -> str:
    return f"prompts-{date.isoformat()}.jsonl"


def write_partitions(directory: Path, prompts: Sequence[object]) -> list[dict]:
    """`prompts` (as `write_prompts` takes them) in order, cut in one contiguous partition per date of
    PARTITION_DATES; a rebuild replaces the directory (and any partition `add_partition` wrote)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    files = []
    bounds = [len(prompts) * index // len(PARTITION_DATES) for index in range(len(PARTITION_DATES) + 1)]
    for date, start, stop in zip(PARTITION_DATES, bounds, bounds[1:], strict=False):
        write_prompts(directory / partition_name(date), prompts[start:stop])
        files.append({"file": f"{directory.name}/{partition_name(date)}", "date": date.isoformat(), "n": stop - start})
    return files


def _model_config(tokenizer: PreTrainedTokenizerFast, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_SHAPE,
        **extra,
    )


def _encode(tokenizer: PreTrainedTokenizerFast, text: str, *, add_special_tokens: bool = False) -> list[int]:
    # The Rust backend directly: the same ids as `tokenizer(text)`, without its per-call overhead.
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def _sft_example(tokenizer: PreTrainedTokenizerFast, prompt: Prompt, rng: random.Random) -> tuple[list[int], list[int]]:
    """(BOS + prompt ids, completion ids + EOS) for one random-mood completion."""
    completion = _encode(tokenizer, sample_completion(rng, prompt.domain)) + [tokenizer.eos_token_id]
    return _encode(tokenizer, prompt.text, add_special_tokens=True), completion


def _pair(
    tokenizer: PreTrainedTokenizerFast, prompt: Prompt, rng: random.Random, label_noise: float
) -> tuple[list[int], list[int]]:
    """(chosen, rejected): prompt + completion ids of two completions the oracle scores differently.

    Each completion is, independently, either finished (ends with EOS) or cut after a random word
    without EOS, because the reward model must score both kinds of PPO responses. With probability
    `label_noise` the order is flipped, as human labels are noisy.
    """
    while True:
        (text_a, ids_a), (text_b, ids_b) = (_maybe_truncated(tokenizer, prompt, rng) for _ in range(2))
        score_a, score_b = oracle_score([prompt.text] * 2, [text_a, text_b])
        if score_a != score_b:
            break
    a_preferred = (score_a > score_b) != (rng.random() < label_noise)
    chosen, rejected = (ids_a, ids_b) if a_preferred else (ids_b, ids_a)
    prompt_ids = _encode(tokenizer, prompt.text, add_special_tokens=True)
    return prompt_ids + chosen, prompt_ids + rejected


def _maybe_truncated(tokenizer: PreTrainedTokenizerFast, prompt: Prompt, rng: random.Random) -> tuple[str, list[int]]:
    """A completion's text and ids: whole with EOS, or (sometimes) cut after a word, without EOS."""
    words = sample_completion(rng, prompt.domain).split()
    if len(words) > 1 and rng.random() < TRUNCATED_FRACTION:
        text = " ".join(words[: rng.randint(1, len(words) - 1)])
        return text, _encode(tokenizer, text)
    text = " ".join(words)
    return text, _encode(tokenizer, text) + [tokenizer.eos_token_id]


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Save the model (safetensors), its tokenizer, and a generation config with the special ids."""
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _sample_report(
    policy: PreTrainedModel, reward: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: list[str]
) -> dict:
    """EOS rate and oracle spread of SFT samples, and how well the reward model ranks them."""
    responses = sample_responses(policy, tokenizer, prompts)
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    oracle = torch.tensor(oracle_score(prompts, completions))
    sequences = [
        prompt_ids + response for prompt_ids, response in zip(tokenizer(prompts)["input_ids"], responses, strict=True)
    ]
    scores = reward_scores(reward, sequences, pad_id=tokenizer.pad_token_id)
    return {
        "n": len(prompts),
        "temperature": SAMPLE_TEMPERATURE,
        "max_new_tokens": SAMPLE_MAX_NEW_TOKENS,
        "eos_rate": sum(tokenizer.eos_token_id in response for response in responses) / len(responses),
        "oracle_mean": oracle.mean().item(),
        "oracle_fraction": {
            "positive": (oracle > 0).float().mean().item(),
            "neutral": (oracle == 0).float().mean().item(),
            "negative": (oracle < 0).float().mean().item(),
        },
        "rm_oracle_pairwise_agreement": pairwise_agreement(scores, oracle),
        "examples": [
            {"prompt": p, "completion": c} for p, c in zip(prompts[:N_SUMMARY_EXAMPLES], completions, strict=False)
        ],
    }


def _tokenizer_facts(tokenizer: PreTrainedTokenizerFast) -> dict:
    probe = tokenizer("the")["input_ids"]
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "unk_token_id": tokenizer.unk_token_id,
        "bos_prepended": probe[0] == tokenizer.bos_token_id,
        "eos_appended": probe[-1] == tokenizer.eos_token_id,
    }


def _versions() -> dict[str, str]:
    packages = ("ppoflow", "torch", "transformers", "tokenizers", "safetensors")
    return {"python": platform.python_version(), **{name: importlib.metadata.version(name) for name in packages}}
