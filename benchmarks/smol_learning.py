"""Did PPO teach SmolLM2 anything real? An independent check of a finished configs/smol.yaml run.

Samples the trained policy (OUTPUT/final) and the reference (the world's policy) with the same seeds
on two prompt sets: the run's held-out eval prompts (new to PPO and to the reward model) and the
world's `unlike.jsonl`, requests of another kind that neither ever saw. Each answer is scored by
both judges — VADER (whose preferences the reward model learned) and AFINN (which it never saw) —
and checked for being an answer: ended with EOS (not cut at the length limit), not empty, not a
repeated word. Plain Hugging Face `generate`, not ppoflow's rollout code, so the check does not
share the engine's bugs.

Writes a JSON report and a plot of the run's periodic evaluation (eval/* in metrics.jsonl, the
curves MLflow shows) and prints the report's headline numbers.

    .venv/bin/python benchmarks/smol_learning.py --world .ppoflow/smol --run runs/smol \\
        --out benchmarks/results/smol_learning.json --plot docs/screenshots/smol-learning.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppoflow.smol import judges
from ppoflow.smol.build import prompt_ids

SEED = 1234
BATCH = 16


def answers(
    model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int, temperature: float
) -> list[dict]:
    """One sampled answer per conversation: text, token count, whether it ended with EOS."""
    eos = tokenizer.eos_token_id
    rows = []
    for start in range(0, len(conversations), BATCH):
        queries = [prompt_ids(tokenizer, messages) for messages in conversations[start : start + BATCH]]
        width = max(map(len, queries))
        input_ids = torch.tensor([[eos] * (width - len(q)) + q for q in queries])
        attention_mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in queries])
        torch.manual_seed(SEED + start)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        for row in output[:, width:].tolist():
            ended = eos in row
            ids = row[: row.index(eos)] if ended else row
            rows.append(
                {"text": tokenizer.decode(ids, skip_special_tokens=True).strip(), "tokens": len(ids), "ended": ended}
            )
    return rows


def is_degenerate(text: str) -> bool:
    """Empty, or one word making up over a third of a 6+ word answer (a repeated word)."""
    words = text.lower().split()
    if not words:
        return True
    return len(words) >= 6 and max(words.count(word) for word in set(words)) > len(words) / 3


def summarize(rows: list[dict]) -> dict:
    texts = [row["text"] for row in rows]
    vader, afinn = judges.vader_score([], texts), judges.afinn_score([], texts)
    return {
        "n": len(rows),
        "judge_vader": statistics.fmean(vader),
        "judge_afinn": statistics.fmean(afinn),
        "eos_rate": statistics.fmean(row["ended"] for row in rows),
        "mean_tokens": statistics.fmean(row["tokens"] for row in rows),
        "degenerate_rate": statistics.fmean(is_degenerate(text) for text in texts),
        "_vader": vader,
    }


def compare(policy, reference, tokenizer, conversations, **sampling) -> dict:
    policy_rows, ref_rows = (answers(model, tokenizer, conversations, **sampling) for model in (policy, reference))
    policy_summary, ref_summary = summarize(policy_rows), summarize(ref_rows)
    wins = [
        1.0 if p > r else 0.5 if p == r else 0.0
        for p, r in zip(policy_summary.pop("_vader"), ref_summary.pop("_vader"), strict=True)
    ]
    examples = [
        {"prompt": messages[-1]["content"], "reference": r["text"], "policy": p["text"]}
        for messages, p, r in list(zip(conversations, policy_rows, ref_rows, strict=True))[:3]
    ]
    return {
        "policy": policy_summary,
        "reference": ref_summary,
        "judge_win_rate": statistics.fmean(wins),
        "examples": examples,
    }


def eval_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key.startswith("eval/"):
                curves.setdefault(key[len("eval/") :], []).append((row["update"], value))
    return curves


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("judge (VADER)", "judge"), ("afinn (never seen)", "afinn"), ("reward model", "reward")]
    figure, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for axis, (title, name) in zip(axes, panels, strict=False):
        for who, style in (("policy", "-o"), ("ref", "--")):
            points = curves.get(f"{name}_{who}", [])
            axis.plot([u for u, _ in points], [v for _, v in points], style, label=who)
        axis.set_title(title)
        axis.set_xlabel("update")
        axis.legend()
    for key, style in (("kl", "-o"), ("eos_rate", "-s")):
        points = curves.get(key, [])
        axes[3].plot([u for u, _ in points], [v for _, v in points], style, label=key)
    axes[3].set_title("KL and EOS rate (policy)")
    axes[3].set_xlabel("update")
    axes[3].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path(".ppoflow/smol"))
    parser.add_argument("--run", type=Path, default=Path("runs/smol"), help="the finished run's output_dir")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    # a LoRA run's final/ holds the adapter; final-merged/ the whole model
    trained = args.run / "final-merged" if (args.run / "final-merged").is_dir() else args.run / "final"
    generation = json.loads((trained / "generation_config.json").read_text())  # the run's own sampling
    sampling = {"max_new_tokens": generation["max_new_tokens"], "temperature": generation["temperature"]}
    tokenizer = AutoTokenizer.from_pretrained(args.world / "policy")
    reference = AutoModelForCausalLM.from_pretrained(args.world / "policy", use_safetensors=True).eval()
    policy = AutoModelForCausalLM.from_pretrained(trained, use_safetensors=True).eval()
    from datasets import load_from_disk

    held_out = [json.loads(text) for text in load_from_disk(str(args.run / "data" / "eval"))["messages"]]
    unlike = [json.loads(line)["prompt"] for line in (args.world / "unlike.jsonl").read_text().splitlines()]
    report = {
        "run": str(args.run),
        "sampling": {**sampling, "seed": SEED},
        "held_out": compare(policy, reference, tokenizer, held_out, **sampling),
        "unlike": compare(policy, reference, tokenizer, unlike, **sampling),
        "eval_curves": eval_curves(args.run / "metrics.jsonl"),
        "final_eval": json.loads((args.run / "eval.json").read_text()),
        "seconds": round(time.perf_counter() - began, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report["eval_curves"], args.plot)
    for name in ("held_out", "unlike"):
        part = report[name]
        print(
            f"{name}: VADER {part['reference']['judge_vader']:+.3f} -> {part['policy']['judge_vader']:+.3f}, "
            f"AFINN {part['reference']['judge_afinn']:+.3f} -> {part['policy']['judge_afinn']:+.3f}, "
            f"EOS {part['reference']['eos_rate']:.2f} -> {part['policy']['eos_rate']:.2f}, "
            f"degenerate {part['policy']['degenerate_rate']:.2f}, VADER win rate {part['judge_win_rate']:.2f}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
