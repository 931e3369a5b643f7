"""`make bench`: ppoflow against TRL 1.12.0's PPOTrainer, side by side, on identical inputs.

    .venv/bin/python benchmarks/run.py            # the full benchmark (~15-20 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # 1 round of tiny sizes (~3 min): checks the harness
    .venv/bin/python benchmarks/run.py --parts smollm2   # SmolLM2-135M at 1 and 2 threads
                                                         # (~10 min; make bench-smol-speed)

What it runs (each implementation in its own fresh subprocess, the same SPEC file for both sides:
benchmarks/ppoflow_side.py with .venv, benchmarks/trl_baseline.py with .venv-bench):

1. yardstick: sustained fp32 torch.mm GFLOP/s (1024x1024) at the benchmark's thread count, before and after;
2. toy size: the offline toy world, batch 64 (4 mini-batches), response_length 32, 4 PPO epochs, a few updates,
   alternating ppoflow / TRL for `--rounds` rounds;
3. large size: a random-weight Llama of ~26 M parameters (8192-token vocabulary, built here once), batch 16;
4. learning parity on the toy: equal episodes, a couple of seeds, per-update curves + greedy evaluation
   (reward model and the hidden oracle on the held-out prompts);
5. orchestration overhead: `ppoflow run` (Prefect flow + MLflow, embedded) against `ppoflow train`, same config;
6. smollm2 (only when `--parts` names it): SmolLM2-135M-Instruct from `ppoflow smol`'s world, the world's prompts
   rendered as text with the chat template, batch 8, 32-token responses, 1 epoch, 3 updates, at 1 and 2 threads,
   per phase against this machine's limits (matmul GFLOP/s for forwards and training, memory bandwidth for decoding).

Only the training loop is timed for throughput (model loading and evaluation are not). Everything goes to
`benchmarks/results/latest.json` (+ `parity.json`, `parity.png`) and a table between the bench markers of
docs/PERFORMANCE.md `<!-- bench:start -->` / `<!-- bench:end -->` markers. `--quick` writes under
.ppoflow/bench/quick instead and leaves the committed results and docs/PERFORMANCE.md alone. The smollm2 part
writes `benchmarks/results/smollm2_speed.json` and its own table between `<!-- bench-smollm2:start -->` /
`<!-- bench-smollm2:end -->`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ppoflow.provenance import git_state

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
WORK = REPO / ".ppoflow" / "bench"
TABLE_PAGE = REPO / "docs" / "PERFORMANCE.md"  # the table between its bench markers is regenerated
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"

# Hyperparameters shared by every toy/large run (configs/toy.yaml's learning settings).
COMMON = {
    "max_prompt_length": 32,
    "stop_token": "eos",
    "temperature": 0.7,
    "missing_eos_penalty": 2.0,
    "kl_coef": 0.05,
    "kl_estimator": "k1",
    "learning_rate": 5e-5,
    "max_grad_norm": 1.0,
    "vf_coef": 0.1,
    "cliprange": 0.2,
    "cliprange_value": 0.2,
    "gamma": 1.0,
    "lam": 0.95,
    "lr_scheduler_type": "linear",
    "batch_semantics": "trl",
}
LARGE_SHAPE = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 7,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 256,
}
TINY_SHAPE = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}

FULL = {
    "rounds": 3,
    "toy": {
        "per_device_train_batch_size": 64,
        "gradient_accumulation_steps": 1,
        "num_mini_batches": 4,
        "local_rollout_forward_batch_size": 64,
        "response_length": 32,
        "num_ppo_epochs": 4,
        "total_episodes": 320,
        "eval_size": 0,
        "seed": 42,
    },
    "large_shape": LARGE_SHAPE,
    "large": {
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "num_mini_batches": 2,
        "local_rollout_forward_batch_size": 16,
        "response_length": 32,
        "num_ppo_epochs": 4,
        "total_episodes": 32,
        "eval_size": 0,
        "seed": 42,
    },
    "parity": {
        "per_device_train_batch_size": 64,
        "gradient_accumulation_steps": 1,
        "num_mini_batches": 4,
        "local_rollout_forward_batch_size": 64,
        "response_length": 32,
        "num_ppo_epochs": 4,
        "total_episodes": 1024,
        "eval_size": 256,
        "oracle": "ppoflow.toy:oracle_score",
        "oracle_per_update": True,
    },
    "parity_seeds": [1, 2],
    "orchestration": {"runs": 3, "total_episodes": 256},
    "yardstick_s": 4.0,
}
QUICK = {
    "rounds": 1,
    "toy": {
        **FULL["toy"],
        "per_device_train_batch_size": 16,
        "num_mini_batches": 2,
        "local_rollout_forward_batch_size": 16,
        "response_length": 16,
        "total_episodes": 32,
    },
    "large_shape": TINY_SHAPE,
    "large": {
        **FULL["large"],
        "per_device_train_batch_size": 8,
        "local_rollout_forward_batch_size": 8,
        "response_length": 16,
        "total_episodes": 8,
    },
    "parity": {
        **FULL["parity"],
        "per_device_train_batch_size": 16,
        "num_mini_batches": 2,
        "local_rollout_forward_batch_size": 16,
        "response_length": 16,
        "total_episodes": 32,
        "eval_size": 32,
    },
    "parity_seeds": [1],
    "orchestration": {"runs": 1, "total_episodes": 64},
    "yardstick_s": 1.0,
}
# ppoflow's memory options, each run once on the large size (RSS barely varies between runs).
MEMORY_VARIANTS = {
    "default": [],
    "ppo.gradient_checkpointing": ["ppo.gradient_checkpointing=true"],
    "models.frozen_dtype=bfloat16": ["models.frozen_dtype=bfloat16"],
    "both": ["ppo.gradient_checkpointing=true", "models.frozen_dtype=bfloat16"],
}
GOALS = {"toy_speedup": 3.0, "large_speedup": 1.5, "memory_ratio": 1.0, "orch_fixed_s": 15.0, "orch_fraction": 0.05}
PHASES = ("rollout", "policy", "ref", "value", "score", "train", "other")
CLASSIC_PARTS = ("toy", "large", "memory", "parity", "orchestration")
PARTS = (*CLASSIC_PARTS, "smollm2")
DEFAULT_PARTS = CLASSIC_PARTS  # smollm2 needs the SmolLM2 world (make smol, ~30 min) and takes ~10 min more


def log(msg: str) -> None:
    print(f"[bench {dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rnd(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(float(x), nd)


# ------------------------------------------------------------------------------------------ environment
def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TRL_EXPERIMENTAL_SILENCE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
            "PYTHONHASHSEED": "0",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        }
    )
    return env


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_info() -> dict[str, Any]:
    """The commit benchmarked and the engine files that differ from it (untracked ones included)."""
    state = git_state(REPO)
    if state is None:
        return {"commit": "", "engine_files_modified": []}
    modified = [
        path for path in (*state.changed, *state.untracked) if path.startswith(("ppoflow/", "flows/", "tasks/"))
    ]
    return {"commit": state.commit[:7], "engine_files_modified": modified}


def machine_info(threads: int, trl_python: Path) -> dict[str, Any]:
    import psutil
    import torch
    import transformers

    def trl_versions() -> dict[str, str]:
        code = (
            "import json, torch, transformers, trl; print(json.dumps({'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'trl': trl.__version__}))"
        )
        out = subprocess.run([str(trl_python), "-c", code], capture_output=True, text=True, env=child_env(threads))
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ours": {"python": sys.executable, "torch": torch.__version__, "transformers": transformers.__version__},
        "trl_side": {"python": str(trl_python), **trl_versions()},
        "git": git_info(),
    }


# ------------------------------------------------------------------------------------------ yardstick
YARDSTICK_CODE = r"""
import json, sys, time, torch
threads, seconds, n = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
a, b = torch.randn(n, n), torch.randn(n, n)
c = torch.empty(n, n)
for _ in range(3):
    torch.mm(a, b, out=c)
rates, end = [], time.perf_counter() + seconds
while time.perf_counter() < end or len(rates) < 5:
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 8:
        torch.mm(a, b, out=c)
        reps += 1
    rates.append(2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
rates.sort()
print(json.dumps({"n": n, "threads": torch.get_num_threads(), "windows": len(rates),
                  "gflops_median": rates[len(rates) // 2], "gflops_max": rates[-1], "gflops_min": rates[0]}))
"""


def measure_in_child(code: str, threads: int, seconds: float, size: int, what: str) -> dict[str, Any]:
    """Run a measuring script (`code`, given threads, seconds and size) in a fresh process on `threads`
    threads; the JSON object its last stdout line holds."""
    out = subprocess.run(
        [sys.executable, "-c", code, str(threads), str(seconds), str(size)],
        capture_output=True,
        text=True,
        env=child_env(threads),
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def yardstick(threads: int, seconds: float) -> dict[str, Any]:
    result = measure_in_child(YARDSTICK_CODE, threads, seconds, 1024, "yardstick")
    log(f"yardstick: torch.mm 1024x1024 fp32, {threads} thread(s): {result['gflops_median']:.1f} GFLOP/s (median)")
    return result


# ------------------------------------------------------------------------------------------ models
def build_large(out_dir: Path, shape: dict[str, int], seed: int = 0) -> dict[str, Any]:
    """A random-weight Llama policy and a LlamaForSequenceClassification reward/value model of the same shape,
    sharing a word-level tokenizer: the toy world's words first (so the toy prompts tokenize as usual), then
    filler tokens up to `vocab_size`. Built once; rebuilt when the shape changes."""
    stamp = out_dir / "bench-model.json"
    wanted = {"shape": shape, "seed": seed, "format": 1}
    if stamp.is_file() and json.loads(stamp.read_text()).get("wanted") == wanted:
        return json.loads(stamp.read_text())
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from ppoflow.toy.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK
    from ppoflow.toy.world import vocabulary

    log(f"building the random-weight Llama pair in {out_dir}")
    tokens = [*SPECIAL_TOKENS, *vocabulary()]
    tokens += [f"tok{i}" for i in range(shape["vocab_size"] - len(tokens))]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=shape["max_position_embeddings"],
    )
    config = {
        **shape,
        "tie_word_embeddings": True,
        "pad_token_id": vocab[PAD],
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
    }
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(LlamaConfig(**config))
    torch.manual_seed(seed + 1)
    reward = LlamaForSequenceClassification(LlamaConfig(**config, num_labels=1))
    info = {"wanted": wanted}
    for model, name in ((policy, "policy"), (reward, "reward")):
        model.save_pretrained(tmp / name, safe_serialization=True)
        tokenizer.save_pretrained(tmp / name)
        info[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
    (tmp / "bench-model.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return info


def matmul_parameters(model_dir: Path, classifier: bool) -> int:
    """Parameters that take part in a matmul per token: every nn.Linear weight (attention, MLP, the LM head
    even when tied to the embedding, the score head); embedding lookups and norms are not counted."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        if classifier:
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def prompt_lengths(model_dir: Path, prompts: Path, max_len: int, eval_size: int) -> float:
    """Mean real tokens of the training prompts (the same selection both sides make)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    for line in prompts.read_text().splitlines():
        if line.strip():
            n = len(tokenizer(json.loads(line)["prompt"])["input_ids"])
            if 0 < n <= max_len:
                lengths.append(n)
    lengths = lengths[: len(lengths) - eval_size] if eval_size else lengths
    return sum(lengths) / len(lengths)


# ------------------------------------------------------------------------------------------ running sides
class SideFailed(RuntimeError):
    pass


def run_side(
    side: str, spec_path: Path, out_path: Path, log_path: Path, threads: int, timeout: float
) -> dict[str, Any]:
    if side == "ours":
        cmd = [sys.executable, str(HERE / "ppoflow_side.py"), "--spec", str(spec_path), "--out", str(out_path)]
    else:
        cmd = [str(ARGS.trl_python), str(HERE / "trl_baseline.py"), "--spec", str(spec_path), "--out", str(out_path)]
    out_path.unlink(missing_ok=True)
    began = time.perf_counter()
    with open(log_path, "w") as handle:
        proc = subprocess.run(
            cmd, cwd=REPO, env=child_env(threads), stdout=handle, stderr=subprocess.STDOUT, timeout=timeout
        )
    wall = time.perf_counter() - began
    if proc.returncode != 0 or not out_path.is_file():
        tail = log_path.read_text()[-3000:]
        raise SideFailed(f"{side} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(out_path.read_text())
    result["process_wall_s"] = round(wall, 3)
    result["command"] = " ".join(cmd)
    tp = result["throughput"]
    log(
        f"  {side:4s}: {tp['episodes_per_s']:.2f} ep/s, {tp['response_tokens_per_s']:.1f} tok/s, train "
        f"{result['timing_s']['train_loop']:.1f}s (cpu {result['timing_s'].get('train_loop_cpu', float('nan')):.1f}s), "
        f"peak RSS {result['memory']['peak_rss_train_mib']} MiB, process {wall:.0f}s"
    )
    return result


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def slim(result: dict[str, Any]) -> dict[str, Any]:
    """A child RESULT without the bulky parts (per-prompt eval lists, the full metric rows)."""
    keep = ("benchmark", "timing_s", "phases_s", "throughput", "memory", "process_wall_s", "machine")
    out = {k: result.get(k) for k in keep if k in result}
    out["throughput"] = {k: v for k, v in result["throughput"].items() if k != "notes"}
    if isinstance(out.get("phases_s"), dict):
        out["phases_s"] = {k: v for k, v in result["phases_s"].items() if k != "notes"}
    ev = result.get("eval") or {}
    out["eval"] = {k: v for k, v in ev.items() if not isinstance(v, list)}
    return out


# ------------------------------------------------------------------------------------------ FLOPs
def flops_per_update(n: dict[str, int], prompt_tokens: float, response_tokens: float, epochs: int) -> dict[str, float]:
    """Useful model FLOPs of one PPO update, on real tokens only (padding is waste, not work):
    tokens = real prompt + real response tokens of the batch; forward = 2 N per token, train = 6 N per token
    (forward + backward) for policy and value in each PPO epoch. Generation counts one forward per token
    (prefill + decode, KV cache). Attention's sequence-quadratic term is left out (< 5% at these lengths)."""
    tokens = prompt_tokens + response_tokens
    fwd = lambda params: 2 * params * tokens  # noqa: E731
    phases = {
        "rollout": fwd(n["policy"]),
        "policy": fwd(n["policy"]),
        "ref": fwd(n["policy"]),
        "value": fwd(n["value"]),
        "score": fwd(n["reward"]),
        "train": 3 * epochs * (fwd(n["policy"]) + fwd(n["value"])),
    }
    # The algorithm needs generation, ref, value, score and training; a separate policy forward is optional
    # (TRL takes the rollout log-probs from generate()'s scores), so it is not counted as useful work.
    phases["useful_total"] = sum(v for k, v in phases.items() if k != "policy")
    return phases


# ------------------------------------------------------------------------------------------ sizes
def throughput_size(
    name: str,
    spec: dict[str, Any],
    rounds: int,
    threads: int,
    n_params: dict[str, int],
    mean_prompt: float,
    run_dir: Path,
) -> dict[str, Any]:
    spec_path = write_spec(run_dir / f"{name}.spec.json", spec)
    rows = []
    for r in range(rounds):
        log(f"{name}: round {r + 1}/{rounds}")
        row = {}
        for side in ("ours", "trl"):  # A B A B
            row[side] = run_side(
                side,
                spec_path,
                run_dir / f"{name}.{side}.r{r}.json",
                run_dir / f"{name}.{side}.r{r}.log",
                threads,
                ARGS.timeout,
            )
        rows.append(row)

    def per_side(side: str) -> dict[str, Any]:
        res = [row[side] for row in rows]
        updates = res[0]["throughput"]["updates"]
        episodes = res[0]["throughput"]["episodes"]
        out = {
            "episodes_per_s": median([x["throughput"]["episodes_per_s"] for x in res]),
            "response_tokens_per_s": median([x["throughput"]["response_tokens_per_s"] for x in res]),
            "episodes_per_cpu_s": median([episodes / x["timing_s"]["train_loop_cpu"] for x in res]),
            "train_loop_s": median([x["timing_s"]["train_loop"] for x in res]),
            "train_loop_cpu_s": median([x["timing_s"]["train_loop_cpu"] for x in res]),
            "peak_rss_train_mib": median([x["memory"]["peak_rss_train_mib"] for x in res]),
            "rss_before_train_mib": median([x["memory"]["rss_before_train_mib"] for x in res]),
            "ru_maxrss_process_mib": median([x["memory"]["ru_maxrss_process_mib"] for x in res]),
            "cuda_max_allocated_mib": median([x["memory"].get("cuda_max_allocated_mib") for x in res]),
            "updates": updates,
            "episodes": episodes,
            "response_tokens_per_update": median([x["throughput"]["response_tokens"] / updates for x in res]),
            "optimizer_steps": res[0]["throughput"]["optimizer_steps"],
            "phases_s_per_update": {
                p: rnd(median([x["phases_s"].get(p, 0.0) / updates for x in res]), 4) for p in PHASES
            },
        }
        per_update = out["train_loop_s"] / updates
        out["phases_share"] = {p: rnd(v / per_update, 3) for p, v in out["phases_s_per_update"].items()}
        # useful model FLOPs at this side's own response lengths
        fl = flops_per_update(
            n_params,
            mean_prompt * spec["per_device_train_batch_size"] * spec["gradient_accumulation_steps"],
            out["response_tokens_per_update"],
            spec["num_ppo_epochs"],
        )
        out["useful_gflop_per_update"] = rnd(fl["useful_total"] / 1e9, 2)
        out["achieved_gflops"] = rnd(fl["useful_total"] / per_update / 1e9, 2)
        out["phase_gflops"] = {
            p: rnd(fl[p] / 1e9 / s, 2) if s and s > 0 else None
            for p, s in out["phases_s_per_update"].items()
            if p in fl
        }
        return {k: (rnd(v, 3) if isinstance(v, float) else v) for k, v in out.items()}

    ratios = {
        "episodes_per_s": [
            row["ours"]["throughput"]["episodes_per_s"] / row["trl"]["throughput"]["episodes_per_s"] for row in rows
        ],
        "response_tokens_per_s": [
            row["ours"]["throughput"]["response_tokens_per_s"] / row["trl"]["throughput"]["response_tokens_per_s"]
            for row in rows
        ],
        "episodes_per_cpu_s": [
            row["trl"]["timing_s"]["train_loop_cpu"] / row["ours"]["timing_s"]["train_loop_cpu"] for row in rows
        ],
        "peak_rss_train": [
            row["ours"]["memory"]["peak_rss_train_mib"] / row["trl"]["memory"]["peak_rss_train_mib"] for row in rows
        ],
    }
    return {
        "spec": spec,
        "params": n_params,
        "matmul_params_note": "nn.Linear weights per model (LM head included, embedding lookups not)",
        "mean_prompt_tokens": rnd(mean_prompt, 2),
        "ours": per_side("ours"),
        "trl": per_side("trl"),
        "ratios_per_round": {k: [rnd(v, 3) for v in vs] for k, vs in ratios.items()},
        "ratios_median": {k: rnd(median(vs), 3) for k, vs in ratios.items()},
        "rounds": [{side: slim(row[side]) for side in row} for row in rows],
        "commands": {side: rows[0][side]["command"] for side in ("ours", "trl")},
    }


def memory_options(spec: dict[str, Any], threads: int, run_dir: Path) -> dict[str, Any]:
    """Peak RSS of ppoflow's training loop with each memory option, on one model size."""
    variants = {}
    for name, overrides in MEMORY_VARIANTS.items():
        log(f"memory: {name}")
        label = name.replace("=", "-").replace(".", "_")
        spec_path = write_spec(
            run_dir / f"memory-{label}.spec.json", {**spec, "name": f"memory-{label}", "ppoflow_overrides": overrides}
        )
        result = run_side(
            "ours", spec_path, run_dir / f"memory-{label}.json", run_dir / f"memory-{label}.log", threads, ARGS.timeout
        )
        variants[name] = {
            "overrides": overrides,
            "peak_rss_train_mib": result["memory"]["peak_rss_train_mib"],
            "rss_before_train_mib": result["memory"]["rss_before_train_mib"],
            "s_per_update": rnd(result["timing_s"]["train_loop"] / result["throughput"]["updates"], 3),
        }
    base = variants["default"]["peak_rss_train_mib"]
    for row in variants.values():
        row["peak_vs_default"] = rnd(row["peak_rss_train_mib"] / base, 3)
    return {"spec": spec["name"], "variants": variants}


def parity(base_spec: dict[str, Any], seeds: list[int], threads: int, run_dir: Path) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    commands = {}
    for seed in seeds:
        spec_path = write_spec(run_dir / f"parity.s{seed}.spec.json", {**base_spec, "seed": seed})
        log(f"parity: seed {seed}")
        for side in ("ours", "trl"):
            res = run_side(
                side,
                spec_path,
                run_dir / f"parity.{side}.s{seed}.json",
                run_dir / f"parity.{side}.s{seed}.log",
                threads,
                ARGS.timeout,
            )
            commands[side] = res["command"]
            runs[side].append(
                {
                    "seed": seed,
                    "curve": [
                        {
                            "update": i + 1,
                            "episode": int(m.get("episode", 0)),
                            "objective/scores": rnd(m.get("objective/scores"), 4),
                            "objective/kl": rnd(m.get("objective/kl"), 4),
                            "reward/oracle": rnd(m.get("reward/oracle"), 4),
                        }
                        for i, m in enumerate(res["metrics"])
                    ],
                    "eval": {k: v for k, v in res["eval"].items() if not isinstance(v, list)},
                    "eval_oracle_values": res["eval"].get("oracle_values"),
                    "eval_rewards": res["eval"].get("rewards"),
                    "train_loop_s": res["timing_s"]["train_loop"],
                }
            )

    def stats(side: str, key: str, per_prompt_key: str) -> dict[str, Any]:
        means = [r["eval"][key] for r in runs[side]]
        per_prompt = [v for r in runs[side] for v in (r[per_prompt_key] or [])]
        sd_prompt = statistics.pstdev(per_prompt) if len(per_prompt) > 1 else 0.0
        return {
            "per_seed": [rnd(m, 4) for m in means],
            "mean": rnd(statistics.fmean(means), 4),
            "seed_sd": rnd(statistics.stdev(means), 4) if len(means) > 1 else None,
            "se": (statistics.stdev(means) / math.sqrt(len(means)))
            if len(means) > 1
            else sd_prompt / math.sqrt(max(1, len(per_prompt))),
            "se_prompts": sd_prompt / math.sqrt(max(1, len(per_prompt))),
        }

    verdict = {}
    for key, per_prompt_key in (("reward_mean", "eval_rewards"), ("oracle_mean", "eval_oracle_values")):
        ours, trl = stats("ours", key, per_prompt_key), stats("trl", key, per_prompt_key)
        # noise: the larger of the seed-to-seed and the per-prompt standard errors of each side, combined
        noise = math.sqrt(max(ours["se"], ours["se_prompts"]) ** 2 + max(trl["se"], trl["se_prompts"]) ** 2)
        verdict[key] = {
            "ours": {k: v for k, v in ours.items() if not k.startswith("se")},
            "trl": {k: v for k, v in trl.items() if not k.startswith("se")},
            "difference": rnd(ours["mean"] - trl["mean"], 4),
            "noise_2se": rnd(2 * noise, 4),
            "pass": ours["mean"] >= trl["mean"] - 2 * noise,
        }
    # The training rollouts' tail: the last quarter of the updates (sampled completions, a batch each), per seed.
    for key in ("objective/scores", "reward/oracle"):
        sides = {}
        for side in ("ours", "trl"):
            per_seed, points = [], []
            for run in runs[side]:
                values = [p[key] for p in run["curve"] if p[key] is not None]
                tail = values[-max(1, len(values) // 4) :]
                if tail:
                    per_seed.append(statistics.fmean(tail))
                    points.extend(v - per_seed[-1] for v in tail)
            if not per_seed:
                break
            se_seeds = statistics.stdev(per_seed) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else 0.0
            se_points = (
                math.sqrt(sum(d * d for d in points) / max(1, len(points) - len(per_seed))) / math.sqrt(len(points))
                if len(points) > len(per_seed)
                else 0.0
            )
            sides[side] = {
                "per_seed": [rnd(v, 4) for v in per_seed],
                "mean": statistics.fmean(per_seed),
                "se": max(se_seeds, se_points),
            }
        if len(sides) == 2:
            noise = math.sqrt(sides["ours"]["se"] ** 2 + sides["trl"]["se"] ** 2)
            verdict[f"rollout_tail {key}"] = {
                "ours": {"per_seed": sides["ours"]["per_seed"], "mean": rnd(sides["ours"]["mean"], 4)},
                "trl": {"per_seed": sides["trl"]["per_seed"], "mean": rnd(sides["trl"]["mean"], 4)},
                "difference": rnd(sides["ours"]["mean"] - sides["trl"]["mean"], 4),
                "noise_2se": rnd(2 * noise, 4),
                "pass": sides["ours"]["mean"] >= sides["trl"]["mean"] - 2 * noise,
            }
    return {
        "spec": base_spec,
        "seeds": seeds,
        "runs": runs,
        "verdict": verdict,
        "commands": commands,
        "rule": "PASS when ours' mean over seeds >= TRL's - 2 x combined standard error (per side the larger of "
        "the seed-to-seed and the per-prompt standard error), on greedy completions of the held-out prompts; "
        "rollout_tail: the mean of the last quarter of the updates' rollout metrics (sampled), per side the "
        "larger of the seed-to-seed and the update-to-update standard error",
    }


def orchestration(toy: Path, threads: int, runs: int, episodes: int, run_dir: Path) -> dict[str, Any]:
    home = WORK / "orch"  # persistent Prefect home and MLflow store (warm after the first make bench)
    (home / "prefect-home").mkdir(parents=True, exist_ok=True)
    env = child_env(threads)
    env.update(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{(home / 'mlflow.db').resolve()}",
            "PREFECT_HOME": str((home / "prefect-home").resolve()),
        }
    )
    env.pop("PREFECT_API_URL", None)
    overrides = [
        f"models.policy={toy / 'policy'}",
        f"models.reward={toy / 'reward'}",
        f"data.path={toy / 'prompts.jsonl'}",
        f"ppo.total_episodes={episodes}",
        "ppo.eval_every=null",  # the demo's evaluations during training are no orchestration cost
        f"flow.result_storage={(home / 'prefect-results').resolve()}",
    ]
    # `python -m ppoflow.flows.cli` is the `ppoflow` console script's entry point
    # (pyproject: ppoflow = ppoflow.flows.cli:main)
    results: dict[str, list[dict[str, Any]]] = {"train": [], "run": []}
    commands = {}
    for i in range(runs):
        for command in ("train", "run"):
            out_dir = run_dir / f"orch-{command}-{i}"
            shutil.rmtree(out_dir, ignore_errors=True)
            cmd = [
                sys.executable,
                "-m",
                "ppoflow.flows.cli",
                command,
                "--config",
                str(REPO / "configs" / "toy.yaml"),
                *[a for o in overrides + [f"output_dir={out_dir}"] for a in ("--set", o)],
            ]
            commands[command] = " ".join(cmd)
            log(f"orchestration: ppoflow {command} ({i + 1}/{runs})")
            began = time.perf_counter()
            with open(run_dir / f"orch-{command}-{i}.log", "w") as handle:
                proc = subprocess.run(
                    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=handle, text=True, timeout=ARGS.timeout
                )
            wall = time.perf_counter() - began
            if proc.returncode != 0:
                raise SideFailed(
                    f"ppoflow {command} failed (exit {proc.returncode}); log {run_dir}/orch-{command}-{i}.log"
                )
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
            metrics = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            results[command].append(
                {
                    "wall_s": round(wall, 2),
                    "reported_wall_s": summary.get("wall_seconds"),
                    "train_steps_s": round(sum(m["timing/step"] for m in metrics), 2),
                }
            )
            log(f"  {command}: {wall:.1f}s wall (training steps {results[command][-1]['train_steps_s']}s)")
            shutil.rmtree(out_dir, ignore_errors=True)
    train_wall = median([r["wall_s"] for r in results["train"]])
    run_wall = median([r["wall_s"] for r in results["run"]])
    overhead = run_wall - train_wall
    allowed = GOALS["orch_fixed_s"] + GOALS["orch_fraction"] * train_wall
    return {
        "runs": results,
        "train_wall_s": rnd(train_wall, 2),
        "run_wall_s": rnd(run_wall, 2),
        "overhead_s": rnd(overhead, 2),
        "allowed_s": rnd(allowed, 2),
        "pass": overhead <= allowed,
        "config": "configs/toy.yaml with --set " + " --set ".join(overrides),
        "commands": commands,
        "env": {
            "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
            "PREFECT_HOME": env["PREFECT_HOME"],
            "PREFECT_API_URL": "(unset: ephemeral Prefect server)",
        },
    }


# ------------------------------------------------------------------------------------------ outputs
def plot_parity(par: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    colors = {"ours": "tab:blue", "trl": "tab:orange"}
    labels = {"ours": "ppoflow", "trl": "TRL 1.12"}
    for ax, key, title in (
        (axes[0], "objective/scores", "objective/scores (rollouts)"),
        (axes[1], "reward/oracle", "oracle score (rollouts)"),
    ):
        for side in ("ours", "trl"):
            for i, run in enumerate(par["runs"][side]):
                xs = [p["episode"] for p in run["curve"] if p[key] is not None]
                ys = [p[key] for p in run["curve"] if p[key] is not None]
                ax.plot(
                    xs,
                    ys,
                    color=colors[side],
                    alpha=0.85,
                    lw=1.3,
                    ls="-" if i == 0 else "--",
                    label=f"{labels[side]} seed {run['seed']}",
                )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("episode", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pf(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def fmt(x: float | None, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{nd}f}"


def cpu_share(size: dict[str, Any], side: str) -> float | None:
    """Median over rounds of the training loop's process CPU seconds per wall second."""
    return median([r[side]["timing_s"]["train_loop_cpu"] / r[side]["timing_s"]["train_loop"] for r in size["rounds"]])


def ceiling(size: dict[str, Any], gflops: float, goal: float) -> dict[str, float]:
    """The arithmetic bound on our speed-up: our useful FLOPs per update at the yardstick's rate (100 % MFU)
    against TRL's measured seconds per update, and the MFU the goal would take."""
    floor = size["ours"]["useful_gflop_per_update"] / gflops
    trl = size["trl"]["train_loop_s"] / size["trl"]["updates"]
    return {
        "floor_s_per_update": rnd(floor, 4),
        "trl_s_per_update": rnd(trl, 4),
        "max_speedup_at_full_mfu": rnd(trl / floor, 3),
        "mfu_needed_for_goal": rnd(goal * floor / trl, 4),
    }


def threads_share(machine: dict[str, Any]) -> str:
    return f"{0.9 * machine['torch_threads']:.1f}"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"_Generated by `make bench` ({res['command']}) on {m['date'][:10]}, commit `{m['git']['commit']}`"
        + (" with uncommitted engine changes" if m["git"]["engine_files_modified"] else "")
        + f"; {m['cpu_model']}, {m['cpu_count']} cores, **{m['torch_threads']} torch thread(s)** on both sides, fp32, "
        f"load average at start {m['load_average_at_start'][0]}; `make bench` took {res['duration_s'] / 60:.1f} min. "
        "Raw numbers: `benchmarks/results/latest.json`. Do not edit by hand._",
        "",
        "ppoflow vs TRL 1.12.0 `PPOTrainer`, same models, prompts, hyperparameters and seed, "
        "each run in a fresh process, "
        f"alternating, {res['rounds']} rounds per size; throughput counts the training loop only. Ratios are ours/TRL, "
        "the median of the per-round ratios.",
        "",
        "| size | metric | ppoflow | TRL 1.12 | ours/TRL | goal | |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for key, label, goal_key in (("toy", "toy", "toy_speedup"), ("large", "large", "large_speedup")):
        s = res["sizes"][key]
        sp = s["spec"]
        desc = (
            f"{label}: {s['params']['policy_total'] / 1e6:.1f} M params, "
            f"batch {sp['per_device_train_batch_size'] * sp['gradient_accumulation_steps']}, "
            f"{sp['num_mini_batches']} mini-batches, response {sp['response_length']}, {s['ours']['updates']} updates"
        )
        g = s["goals"]
        lines += [
            f"| {desc} | episodes/s | {fmt(s['ours']['episodes_per_s'], 2)} | {fmt(s['trl']['episodes_per_s'], 2)} | "
            f"**{fmt(s['ratios_median']['episodes_per_s'], 2)}×** | ≥ {GOALS[goal_key]}× | {pf(g['speedup'])} |",
            f"| | response tokens/s | {fmt(s['ours']['response_tokens_per_s'])} | "
            f"{fmt(s['trl']['response_tokens_per_s'])} | "
            f"{fmt(s['ratios_median']['response_tokens_per_s'], 2)}× | | |",
            f"| | episodes per CPU-second | {fmt(s['ours']['episodes_per_cpu_s'], 2)} | "
            f"{fmt(s['trl']['episodes_per_cpu_s'], 2)} | "
            f"{fmt(s['ratios_median']['episodes_per_cpu_s'], 2)}× | | |",
            f"| | CPU-seconds per wall-second (< {threads_share(m)} = other jobs took the core) | "
            f"{fmt(cpu_share(s, 'ours'), 2)} | {fmt(cpu_share(s, 'trl'), 2)} | | | |",
            f"| | peak RSS in training (MiB; before training) | {fmt(s['ours']['peak_rss_train_mib'], 0)} "
            f"({fmt(s['ours']['rss_before_train_mib'], 0)}) | "
            f"{fmt(s['trl']['peak_rss_train_mib'], 0)} ({fmt(s['trl']['rss_before_train_mib'], 0)}) | "
            f"{fmt(s['ratios_median']['peak_rss_train'], 3)} | ≤ 1 | {pf(g['memory'])} |",
            f"| | model-FLOPs utilisation | {fmt(100 * s['ours']['mfu'])} % | {fmt(100 * s['trl']['mfu'])} % | | | |",
            "| | ceiling: ours/TRL if ours ran at 100 % MFU "
            f"(the goal needs {fmt(100 * s['ceiling']['mfu_needed_for_goal'])} % MFU) | "
            f"{fmt(s['ceiling']['floor_s_per_update'], 2)} s/update | "
            f"{fmt(s['ceiling']['trl_s_per_update'], 2)} s/update | "
            f"{fmt(s['ceiling']['max_speedup_at_full_mfu'], 2)}× | | |",
        ]
    lines += [
        "",
        f"Per-round episodes/s ratios: toy {res['sizes']['toy']['ratios_per_round']['episodes_per_s']}, "
        f"large {res['sizes']['large']['ratios_per_round']['episodes_per_s']}.",
        "",
    ]
    shares = [cpu_share(res["sizes"][k], side) for k in ("toy", "large") for side in ("ours", "trl")]
    if min(x for x in shares if x is not None) < 0.9 * m["torch_threads"]:
        lines += [
            "**Contended run**: other jobs held the core during some runs (CPU-seconds per wall-second "
            f"down to {min(shares):.2f}), so wall-clock numbers and their ratios are noisy; the episodes per "
            "CPU-second ratio is the reliable comparison here. Re-run `make bench` on a quieter machine.",
            "",
        ]
    lines += [
        "Seconds per update by phase (median; rollout = generation, policy = ppoflow's log-prob forward "
        "(0 when recorded during generation), "
        "other = advantages, bookkeeping, TRL's `gc.collect()`):",
        "",
        "| size | side | " + " | ".join(PHASES) + " | total |",
        "|---|---|" + "---:|" * (len(PHASES) + 1),
    ]
    for key in ("toy", "large"):
        for side, label in (("ours", "ppoflow"), ("trl", "TRL")):
            s = res["sizes"][key][side]
            ph = s["phases_s_per_update"]
            lines.append(
                f"| {key} | {label} | "
                + " | ".join(fmt(ph.get(p), 3) for p in PHASES)
                + f" | {fmt(s['train_loop_s'] / s['updates'], 3)} |"
            )
    y = res["yardstick"]
    lines += [
        "",
        f"Hardware yardstick: torch.mm 1024×1024 fp32 at {m['torch_threads']} thread(s): "
        f"{fmt(y['gflops'])} GFLOP/s (the higher of the medians before, {fmt(y['before']['gflops_median'])}, "
        f"and after, {fmt(y['after']['gflops_median'])}). Model-FLOPs utilisation = useful FLOPs per update / "
        "seconds per update / "
        "yardstick, with useful FLOPs = 2·N·tokens for generation, reference, value and reward forwards and "
        "6·N·tokens·epochs for policy and value training, N = nn.Linear parameters (LM head included), "
        "tokens = real prompt + response tokens.",
        "",
    ]
    mem = res.get("memory")
    if mem:
        lines += [
            "ppoflow's memory options on the large size (one run each; peak RSS of the training loop, whole "
            "process; on a GPU the same options cut device memory):",
            "",
            "| options | peak RSS in training (MiB) | vs default | RSS before training (MiB) | s/update |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in mem["variants"].items():
            lines.append(
                f"| {name} | {fmt(row['peak_rss_train_mib'], 0)} | {fmt(row['peak_vs_default'], 3)} | "
                f"{fmt(row['rss_before_train_mib'], 0)} | {fmt(row['s_per_update'], 2)} |"
            )
        lines.append("")
    par = res.get("parity")
    if par:
        v = par["verdict"]
        lines += [
            f"Learning parity on the toy ({par['spec']['total_episodes']} episodes, seeds {par['seeds']}, greedy "
            f"evaluation on {par['spec']['eval_size']} held-out prompts):",
            "",
            "| metric | ppoflow | TRL 1.12 | difference | 2 × noise | ours ≥ TRL |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for key, label in (
            ("reward_mean", "eval: reward-model score"),
            ("oracle_mean", "eval: oracle score"),
            ("rollout_tail objective/scores", "rollouts, last quarter: objective/scores"),
            ("rollout_tail reward/oracle", "rollouts, last quarter: oracle score"),
        ):
            if key not in v:
                continue
            lines.append(
                f"| {label} | {fmt(v[key]['ours']['mean'], 3)} {v[key]['ours']['per_seed']} | "
                f"{fmt(v[key]['trl']['mean'], 3)} {v[key]['trl']['per_seed']} | {fmt(v[key]['difference'], 3)} | "
                f"{fmt(v[key]['noise_2se'], 3)} | {pf(v[key]['pass'])} |"
            )
        lines += ["", "Learning curves of both sides: `benchmarks/results/parity.png` (with `parity.json`).", ""]
    o = res.get("orchestration")
    if o:
        lines += [
            f"Orchestration: `ppoflow run` (Prefect + MLflow, embedded) {fmt(o['run_wall_s'])} s vs `ppoflow train` "
            f"{fmt(o['train_wall_s'])} s wall (toy config, {len(o['runs']['train'])} runs each, median): overhead "
            f"{fmt(o['overhead_s'])} s, goal ≤ {fmt(o['allowed_s'])} s (15 s + 5 %): **{pf(o['pass'])}**.",
            "",
        ]
    return "\n".join(lines)


def inject_table(table: str) -> None:
    inject_block(MARK_START, MARK_END, table)


# ------------------------------------------------------------------------------------------ SmolLM2 speed
# `--parts smollm2` (make bench-smol-speed): ppoflow vs TRL on SmolLM2-135M-Instruct, the real model of
# docs/REAL_MODEL.md, in the shape of issue #26: configs/smol.yaml's learning settings, batch 8 in one mini-batch,
# 32-token responses, 1 PPO epoch, 3 updates; both sides at 1 and at 2 threads, alternating.
SMOL_WORLD = REPO / ".ppoflow" / "smol"
SMOL_MARK_START, SMOL_MARK_END = "<!-- bench-smollm2:start -->", "<!-- bench-smollm2:end -->"
SMOL_SPEC = {
    "max_prompt_length": 80,
    "stop_token": "eos",
    "temperature": 0.7,
    "missing_eos_penalty": 1.0,
    "kl_coef": 0.05,
    "kl_estimator": "k1",
    "learning_rate": 1e-5,
    "max_grad_norm": 1.0,
    "vf_coef": 0.1,
    "cliprange": 0.2,
    "cliprange_value": 0.2,
    "gamma": 1.0,
    "lam": 0.95,
    "lr_scheduler_type": "linear",
    "batch_semantics": "trl",
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_mini_batches": 1,
    "local_rollout_forward_batch_size": 8,
    "response_length": 32,
    "num_ppo_epochs": 1,
    "total_episodes": 24,
    "eval_size": 0,
    "seed": 42,
}
SMOL_FULL = {"rounds": 2, "threads": "1,2", "spec": {}, "yardstick_s": 4.0, "bandwidth_s": 2.0}
SMOL_QUICK = {
    "rounds": 1,
    "threads": "1",
    "spec": {"response_length": 8, "total_episodes": 16},
    "yardstick_s": 1.0,
    "bandwidth_s": 0.5,
}
SMOL_GOALS = {"speedup": 1.5, "memory_ratio": 1.0}
SMOL_PHASES = ("generation", "policy", "ref", "value", "reward", "training", "other")
FP32_BYTES = 4

BANDWIDTH_CODE = r"""
import json, sys, time, torch
threads, seconds, mib = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
x = torch.ones(mib * 2**20 // 4)
y = torch.empty_like(x)
def rate(op, bytes_moved):
    for _ in range(2):
        op()
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 5:
        t0 = time.perf_counter()
        op()
        rates.append(bytes_moved / (time.perf_counter() - t0) / 1e9)
    rates.sort()
    return {"gbs_median": rates[len(rates) // 2], "gbs_max": rates[-1], "gbs_min": rates[0], "windows": len(rates)}
print(json.dumps({"mib": mib, "threads": torch.get_num_threads(), "read": rate(lambda: x.sum(), 4 * x.numel()),
                  "copy": rate(lambda: y.copy_(x), 2 * 4 * x.numel())}))
"""


def bandwidth(threads: int, seconds: float) -> dict[str, Any]:
    """Memory bandwidth in GB/s: `sum()` of a 512 MiB fp32 tensor (reads only, as decoding reads weights) and
    `copy_()` into another (read + write, both counted), far beyond any cache."""
    result = measure_in_child(BANDWIDTH_CODE, threads, seconds, 512, "bandwidth yardstick")
    log(
        f"bandwidth: 512 MiB fp32, {threads} thread(s): read {result['read']['gbs_median']:.1f} GB/s, "
        f"copy {result['copy']['gbs_median']:.1f} GB/s (medians)"
    )
    return result


def render_chat_prompts(source: Path, policy: Path, out: Path) -> Path:
    """The world's conversations rendered once as text with the policy's chat template and the generation prompt,
    one `{"prompt": text}` a line: both sides read the same text and tokenize it the same way (this tokenizer adds
    no special tokens to text, so the ids equal `apply_chat_template(tokenize=True)`'s)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    rendered = []
    for line in source.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        prompt = row["prompt"] if "prompt" in row else row["messages"]
        if not isinstance(prompt, str):
            if "prompt" not in row and prompt[-1]["role"] == "assistant":  # TRL's messages format: drop the answer
                prompt = prompt[:-1]
            prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        rendered.append(json.dumps({"prompt": prompt}) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(rendered))
    return out


def linear_split(model_dir: Path, classifier: bool) -> dict[str, int]:
    """A model's nn.Linear weights: `body` (attention and MLP of every layer) and `head` (the top-level LM head,
    tied or not, or the score head), which runs only where its output is needed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        if classifier:
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    linears = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = sum(count for name, count in linears.items() if "." not in name)
    return {"body": sum(linears.values()) - head, "head": head}


def per_update(result: dict[str, Any], side: str) -> list[dict[str, float]]:
    """Seconds per phase, wall seconds and token counts of each update, from a side's metric rows: ppoflow's
    `timing/*` metrics; TRL's cumulative forward-hook timings (`bench/phases_cum_s`), differenced."""
    updates, previous = [], {"wall": 0.0, "generated": 0, "response": 0, "cum": {}}
    for row in result["metrics"]:
        if side == "ours":
            phases = {
                "generation": row["timing/rollout"],
                "policy": row["timing/policy"],
                "ref": row["timing/ref"],
                "value": row["timing/value"],
                "reward": row["timing/score"],
                "training": row["timing/train"],
            }
        else:
            cum = row["bench/phases_cum_s"]
            delta = {k: v - previous["cum"].get(k, 0.0) for k, v in cum.items()}
            phases = {
                "generation": delta["rollout"],
                "policy": 0.0,
                "ref": delta["ref"],
                "value": delta["value"],
                "reward": delta["score"],
                "training": delta["train"],
            }
            previous["cum"] = cum
        step = row["bench/wall_s"] - previous["wall"]
        phases["other"] = step - sum(phases.values())
        updates.append(
            {
                **phases,
                "step": step,
                "generated_tokens": row["bench/generated_tokens_cum"] - previous["generated"],
                "response_tokens": row["bench/response_tokens_cum"] - previous["response"],
            }
        )
        previous.update(
            wall=row["bench/wall_s"],
            generated=row["bench/generated_tokens_cum"],
            response=row["bench/response_tokens_cum"],
        )
    return updates


def phase_limits(
    update: dict[str, float],
    n: dict[str, dict[str, int]],
    prompt_tokens: float,
    batch: int,
    epochs: int,
    gflops: float,
    read_gbs: float,
) -> dict[str, float]:
    """The fastest this machine could run each phase of one update, in seconds, on real tokens only.

    Forwards at 2 FLOPs and training (forward + backward) at 6 FLOPs per matmul weight per token, at the matmul
    yardstick's rate; the LM head counts only where log-probs are needed (response tokens; the last prompt token in
    prefill). Generation = prefill (compute) + decoding, whose every step reads all fp32 matmul weights once
    (bandwidth) and computes the real response tokens (compute): the slower of the two bounds is the limit."""
    policy, value = n["policy"], n["value"]
    tokens = prompt_tokens + update["response_tokens"]
    steps = update["generated_tokens"] / batch  # generate() steps; the first comes out of the prefill
    policy_forward = 2 * (policy["body"] * tokens + policy["head"] * update["response_tokens"])
    value_forward = 2 * (value["body"] + value["head"]) * tokens
    prefill_s = 2 * (policy["body"] * prompt_tokens + policy["head"] * batch) / (gflops * 1e9)
    decode_bytes = FP32_BYTES * (policy["body"] + policy["head"]) * max(steps - 1, 0)
    decode_flops = 2 * (policy["body"] + policy["head"]) * max(update["response_tokens"] - batch, 0)
    decode_bandwidth_s, decode_compute_s = decode_bytes / (read_gbs * 1e9), decode_flops / (gflops * 1e9)
    limits = {
        "generation": prefill_s + max(decode_bandwidth_s, decode_compute_s),
        "policy": policy_forward / (gflops * 1e9),
        "ref": policy_forward / (gflops * 1e9),
        "value": value_forward / (gflops * 1e9),
        "reward": value_forward / (gflops * 1e9),
        "training": 3 * epochs * (policy_forward + value_forward) / (gflops * 1e9),
    }
    limits["useful_total"] = sum(v for k, v in limits.items() if k != "policy")  # a policy forward is optional
    limits.update(
        prefill_s=prefill_s,
        decode_bandwidth_s=decode_bandwidth_s,
        decode_compute_s=decode_compute_s,
        decode_gb=decode_bytes / 1e9,
    )
    return limits


def smol_side(
    results: list[dict[str, Any]],
    side: str,
    n: dict[str, dict[str, int]],
    prompt_tokens: float,
    spec: dict[str, Any],
    limits_at: dict[str, float],
) -> dict[str, Any]:
    """One side at one thread count: throughput and memory (median over rounds), and per phase the median of
    the updates after the first (pooled over rounds), the first update apart, the limit and the fraction of it."""
    batch = spec["per_device_train_batch_size"] * spec["gradient_accumulation_steps"]
    runs = [per_update(r, side) for r in results]
    later = [u for run in runs for u in run[1:]] or [u for run in runs for u in run]
    firsts = [run[0] for run in runs]
    keys = (*SMOL_PHASES, "step")
    steady = {k: median([u[k] for u in later]) for k in keys}
    limits = [
        phase_limits(u, n, prompt_tokens, batch, spec["num_ppo_epochs"], limits_at["gflops"], limits_at["read_gbs"])
        for u in later
    ]
    limit = {k: median([x[k] for x in limits]) for k in limits[0]}
    return {
        "episodes_per_s": rnd(median([r["throughput"]["episodes_per_s"] for r in results]), 4),
        "episodes_per_s_after_first": rnd(batch / steady["step"], 4),
        "train_loop_s": rnd(median([r["timing_s"]["train_loop"] for r in results])),
        "cpu_per_wall": rnd(median([r["timing_s"]["train_loop_cpu"] / r["timing_s"]["train_loop"] for r in results])),
        "peak_rss_train_mib": median([r["memory"]["peak_rss_train_mib"] for r in results]),
        "rss_before_train_mib": median([r["memory"]["rss_before_train_mib"] for r in results]),
        "updates": results[0]["throughput"]["updates"],
        "episodes": results[0]["throughput"]["episodes"],
        "response_tokens_per_update": rnd(median([u["response_tokens"] for u in later]), 1),
        "decode_steps_per_update": rnd(median([u["generated_tokens"] / batch for u in later]), 1),
        "phases_s_after_first": {k: rnd(v) for k, v in steady.items()},
        "phases_s_first": {k: rnd(median([u[k] for u in firsts])) for k in keys},
        "limit_s": {k: rnd(v, 4) for k, v in limit.items()},
        "fraction_of_limit": {
            p: rnd(limit[p] / steady[p], 3) if steady[p] and steady[p] > 0.005 else None
            for p in SMOL_PHASES
            if p in limit
        },
        "fraction_of_limit_step": rnd(limit["useful_total"] / steady["step"], 3),
        "per_update": [[{k: rnd(v) for k, v in u.items()} for u in run] for run in runs],
    }


def smol_speed(world: Path, cfg: dict[str, Any], threads_list: list[int], rounds: int, run_dir: Path) -> dict[str, Any]:
    policy, reward = world / "policy", world / "reward"
    prompts = render_chat_prompts(world / "prompts.jsonl", policy, run_dir / "smollm2-prompts.jsonl")
    spec = {
        "name": "smollm2-speed",
        "policy": str(policy),
        "reward": str(reward),
        "value": str(reward),
        "prompts": str(prompts),
        **SMOL_SPEC,
        **cfg["spec"],
    }
    n = {"policy": linear_split(policy, False), "value": linear_split(reward, True)}  # reward and value: one checkpoint
    mean_prompt = prompt_lengths(policy, prompts, spec["max_prompt_length"], spec["eval_size"])
    batch = spec["per_device_train_batch_size"] * spec["gradient_accumulation_steps"]
    out: dict[str, Any] = {"spec": spec, "matmul_params": n, "mean_prompt_tokens": rnd(mean_prompt, 2), "threads": {}}
    for threads in threads_list:
        spec_path = write_spec(run_dir / f"smollm2-t{threads}.spec.json", {**spec, "torch_threads": threads})
        before = {"matmul": yardstick(threads, cfg["yardstick_s"]), "bandwidth": bandwidth(threads, cfg["bandwidth_s"])}
        rows = []
        for r in range(rounds):
            log(f"smollm2, {threads} thread(s): round {r + 1}/{rounds}")
            rows.append(
                {
                    side: run_side(
                        side,
                        spec_path,
                        run_dir / f"smollm2-t{threads}.{side}.r{r}.json",
                        run_dir / f"smollm2-t{threads}.{side}.r{r}.log",
                        threads,
                        ARGS.timeout,
                    )
                    for side in ("ours", "trl")
                }
            )
        after = {"matmul": yardstick(threads, cfg["yardstick_s"]), "bandwidth": bandwidth(threads, cfg["bandwidth_s"])}
        limits_at = {
            "gflops": max(before["matmul"]["gflops_median"], after["matmul"]["gflops_median"]),
            "read_gbs": max(before["bandwidth"]["read"]["gbs_median"], after["bandwidth"]["read"]["gbs_median"]),
        }
        sides = {
            side: smol_side([row[side] for row in rows], side, n, mean_prompt * batch, spec, limits_at)
            for side in ("ours", "trl")
        }
        ratios = {
            "episodes_per_s": [
                row["ours"]["throughput"]["episodes_per_s"] / row["trl"]["throughput"]["episodes_per_s"] for row in rows
            ],
            "peak_rss_train": [
                row["ours"]["memory"]["peak_rss_train_mib"] / row["trl"]["memory"]["peak_rss_train_mib"] for row in rows
            ],
        }
        speedup, memory = median(ratios["episodes_per_s"]), median(ratios["peak_rss_train"])
        trl_step = sides["trl"]["phases_s_after_first"]["step"]
        out["threads"][str(threads)] = {
            "yardsticks": {"before": before, "after": after, "limits": {k: rnd(v, 2) for k, v in limits_at.items()}},
            "ours": sides["ours"],
            "trl": sides["trl"],
            "ratios_per_round": {k: [rnd(v, 3) for v in vs] for k, vs in ratios.items()},
            "ratios_median": {
                "episodes_per_s": rnd(speedup, 3),
                "peak_rss_train": rnd(memory, 3),
                "episodes_per_s_after_first": rnd(
                    sides["ours"]["episodes_per_s_after_first"] / sides["trl"]["episodes_per_s_after_first"], 3
                ),
            },
            # TRL's seconds per update over ours at 100 % of every phase's limit: the most any speed-up can be
            "max_speedup_at_limit": rnd(trl_step / sides["ours"]["limit_s"]["useful_total"], 2),
            "goals": {"speedup": speedup >= SMOL_GOALS["speedup"], "memory": memory <= SMOL_GOALS["memory_ratio"]},
            "rounds": [{side: slim(row[side]) for side in row} for row in rows],
            "commands": {side: rows[0][side]["command"] for side in ("ours", "trl")},
        }
    return out


def smol_markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["smollm2"]
    sp = s["spec"]
    lines = [
        f"_Generated by `make bench-smol-speed` ({res['command']}) on {m['date'][:10]}, commit `{m['git']['commit']}`"
        + (" with uncommitted engine changes" if m["git"]["engine_files_modified"] else "")
        + f"; {m['cpu_model']}, {m['cpu_count']} cores, fp32, load average at start {m['load_average_at_start'][0]}; "
        f"it took {res['duration_s'] / 60:.1f} min. "
        "Raw numbers: `benchmarks/results/smollm2_speed.json`. Do not edit by hand._",
        "",
    ]
    end = m.get("git_at_end")
    if end and end != m["git"]:
        lines += [
            f"_Engine files changed while it ran (the later ppoflow runs imported them): commit `{end['commit']}`, "
            f"modified {', '.join(f'`{f}`' for f in end['engine_files_modified']) or 'none'}._",
            "",
        ]
    lines += [
        f"SmolLM2-135M-Instruct policy, reward and value models from one reward checkpoint (`ppoflow smol`'s world); "
        "the world's prompts rendered once with the ChatML template as text "
        f"(mean {fmt(s['mean_prompt_tokens'])} tokens), "
        f"batch {sp['per_device_train_batch_size']} in {sp['num_mini_batches']} mini-batch, responses of up to "
        f"{sp['response_length']} tokens, {sp['num_ppo_epochs']} PPO epoch, "
        f"{sp['total_episodes'] // sp['per_device_train_batch_size']} "
        f"updates; each side in a fresh process, alternating, {res['rounds']} round(s) per thread count. "
        "Ratios are ours/TRL.",
        "",
        "| threads | metric | ppoflow | TRL 1.12 | ours/TRL | goal | |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for threads, t in s["threads"].items():
        o, b, g = t["ours"], t["trl"], t["goals"]
        lines += [
            f"| {threads} | episodes/s (the whole training loop) | {fmt(o['episodes_per_s'], 3)} | "
            f"{fmt(b['episodes_per_s'], 3)} | "
            f"**{fmt(t['ratios_median']['episodes_per_s'], 2)}×** | ≥ {SMOL_GOALS['speedup']}× | {pf(g['speedup'])} |",
            f"| | episodes/s, updates after the first (median) | {fmt(o['episodes_per_s_after_first'], 3)} | "
            f"{fmt(b['episodes_per_s_after_first'], 3)} | "
            f"{fmt(t['ratios_median']['episodes_per_s_after_first'], 2)}× | | |",
            f"| | peak RSS in training, MiB (before training) | {fmt(o['peak_rss_train_mib'], 0)} "
            f"({fmt(o['rss_before_train_mib'], 0)}) | "
            f"{fmt(b['peak_rss_train_mib'], 0)} ({fmt(b['rss_before_train_mib'], 0)}) | "
            f"{fmt(t['ratios_median']['peak_rss_train'], 3)} | "
            f"≤ 1 | {pf(g['memory'])} |",
            f"| | CPU-seconds per wall-second (< {0.9 * int(threads):.1f}: other jobs took a core) | "
            f"{fmt(o['cpu_per_wall'], 2)} | "
            f"{fmt(b['cpu_per_wall'], 2)} | | | |",
            "| | ceiling: TRL's s/update over ours at 100 % of every limit | | | "
            f"{fmt(t['max_speedup_at_limit'], 2)}× | | |",
        ]
    lines += [
        "",
        "Seconds per update by phase: the median of the updates after the first (the first update in "
        "brackets); `limit` is this machine's fastest for the same work, and `% of limit` = limit / seconds. "
        "policy = ppoflow's separate log-prob forward (0 when the log-probs are recorded during generation); "
        "other = advantages, bookkeeping, TRL's `gc.collect()`.",
        "",
        "| threads | side | " + " | ".join(SMOL_PHASES) + " | update |",
        "|---|---|" + "---:|" * (len(SMOL_PHASES) + 1),
    ]
    for threads, t in s["threads"].items():
        for side, label in (("ours", "ppoflow"), ("trl", "TRL")):
            x = t[side]
            lines.append(
                f"| {threads} | {label} | "
                + " | ".join(
                    f"{fmt(x['phases_s_after_first'][p], 2)} ({fmt(x['phases_s_first'][p], 2)})"
                    for p in (*SMOL_PHASES, "step")
                )
                + " |"
            )
        for side, label in (("ours", "ppoflow"), ("trl", "TRL")):
            x = t[side]
            fr = {**x["fraction_of_limit"], "step": x["fraction_of_limit_step"]}
            lines.append(
                f"| | {label}: % of limit | "
                + " | ".join("" if fr.get(p) is None else f"{fmt(100 * fr[p], 0)} %" for p in (*SMOL_PHASES, "step"))
                + " |"
            )
        lim = t["ours"]["limit_s"]
        lines.append(
            "| | limit (s), ppoflow's tokens | "
            + " | ".join(fmt(lim.get(p), 2) if p in lim else "" for p in SMOL_PHASES)
            + f" | {fmt(lim['useful_total'], 2)} |"
        )
    lines += ["", "This machine's limits, measured before and after each thread count's runs (the higher median):", ""]
    for threads, t in s["threads"].items():
        y, lim = t["yardsticks"], t["ours"]["limit_s"]
        copy_gbs = max(y["before"]["bandwidth"]["copy"]["gbs_median"], y["after"]["bandwidth"]["copy"]["gbs_median"])
        lines.append(
            f"- {threads} thread(s): fp32 `torch.mm` 1024×1024 **{fmt(y['limits']['gflops'])} GFLOP/s**; memory "
            f"read (`sum` of 512 MiB) **{fmt(y['limits']['read_gbs'])} GB/s** (copy "
            f"{fmt(copy_gbs)} GB/s). "
            f"Generation's limit: prefill {fmt(lim['prefill_s'], 2)} s + decoding max(weights read "
            f"{fmt(lim['decode_gb'])} GB at the read rate {fmt(lim['decode_bandwidth_s'], 2)} s, its matmuls "
            f"{fmt(lim['decode_compute_s'], 2)} s)."
        )
    lines += [
        "",
        "Limits count `nn.Linear` weights (policy: attention and MLP "
        f"{s['matmul_params']['policy']['body'] / 1e6:.1f} M, "
        f"LM head {s['matmul_params']['policy']['head'] / 1e6:.1f} M, tied; reward/value "
        f"{(s['matmul_params']['value']['body'] + s['matmul_params']['value']['head']) / 1e6:.1f} M) "
        "× real tokens (prompt + response): 2 FLOPs a weight a token for the reference, value and reward forwards, "
        "6 for training policy and value, the LM head only on response tokens; "
        "each decoding step reads every fp32 weight once. "
        "Attention's sequence-quadratic term and the KV cache are left out (small at ~75 tokens).",
        "",
    ]
    return "\n".join(lines)


def inject_block(start: str, end: str, table: str) -> None:
    text = TABLE_PAGE.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{TABLE_PAGE} has lost its {start} / {end} markers: put them back where the table goes")
    block = f"{start}\n{table}\n{end}"
    TABLE_PAGE.write_text(re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: block, text, flags=re.S))


# ------------------------------------------------------------------------------------------ main
ARGS = argparse.Namespace()  # the command line, set by main()


def main(argv: list[str] | None = None) -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 round of tiny sizes; results under .ppoflow/bench/quick"
    )
    parser.add_argument(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: {','.join(DEFAULT_PARTS)}; "
        "smollm2 runs only when named: make bench-smol-speed)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("BENCH_THREADS", "1")),
        help="torch/OpenMP threads for both sides (default 1, or $BENCH_THREADS; see benchmarks/README.md)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per size (default 3, smollm2 2; 1 with --quick)"
    )
    parser.add_argument("--toy", type=Path, default=WORK / "toy", help="the toy world (built by make bench)")
    parser.add_argument("--smol-world", type=Path, default=SMOL_WORLD, help="the SmolLM2 world (built by make smol)")
    parser.add_argument(
        "--smol-threads",
        default=None,
        help="comma-separated thread counts of the smollm2 part, each for both sides (default 1,2; 1 with --quick)",
    )
    parser.add_argument("--trl-python", type=Path, default=REPO / ".venv-bench" / "bin" / "python")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=list(CLASSIC_PARTS),
        help="leave a part out (the performance table then lacks it)",
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per child process")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="only regenerate a performance table (docs/PERFORMANCE.md) from an existing results file "
        "(latest.json or smollm2_speed.json; no runs)",
    )
    ARGS = parser.parse_args(argv)
    if ARGS.render is not None:
        res = json.loads(ARGS.render.read_text())
        if "smollm2" in res:
            inject_block(SMOL_MARK_START, SMOL_MARK_END, smol_markdown(res))
        else:
            inject_table(markdown(res))
        log(f"docs/PERFORMANCE.md table regenerated from {ARGS.render}")
        return 0
    parts = {p.strip() for p in ARGS.parts.split(",") if p.strip()}
    if parts - set(PARTS):
        parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    ARGS.skip = sorted(set(ARGS.skip) | (set(CLASSIC_PARTS) - parts))
    if not ARGS.trl_python.is_file():
        log(f"no TRL venv python at {ARGS.trl_python}: run `make bench-venv`")
        return 2
    sys.path.insert(0, str(REPO))
    command = ("benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    status = 0
    if set(CLASSIC_PARTS) - set(ARGS.skip):
        status = classic(command)
    if status == 0 and "smollm2" in parts:
        status = smollm2(command)
    return status


def classic(command: str) -> int:
    """The toy and large sizes, memory options, learning parity and orchestration: latest.json and its table."""
    cfg = QUICK if ARGS.quick else FULL
    rounds = ARGS.rounds or cfg["rounds"]
    threads = ARGS.threads
    began = time.perf_counter()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_root = (WORK / "quick") if ARGS.quick else RESULTS
    run_dir = WORK / "runs" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    out_root.mkdir(parents=True, exist_ok=True)
    toy = ARGS.toy.resolve()
    if not (toy / "toy.json").is_file():
        log(f"no toy world in {toy}: build it with `.venv/bin/ppoflow toy --out {toy}` (make bench does)")
        return 2
    log(f"{'quick' if ARGS.quick else 'full'} benchmark, {threads} thread(s), {rounds} round(s); logs in {run_dir}")

    res: dict[str, Any] = {
        "command": command.strip(),
        "quick": ARGS.quick,
        "rounds": rounds,
        "goals": GOALS,
        "machine": machine_info(threads, ARGS.trl_python),
        "logs": str(run_dir.relative_to(REPO)),
    }
    y_before = yardstick(threads, cfg["yardstick_s"])
    res["sizes"] = {}

    toy_models = {"policy": toy / "policy", "reward": toy / "reward"}
    large_dir = WORK / ("llama-tiny" if ARGS.quick else "llama-26m")
    if "large" not in ARGS.skip:
        large_info = build_large(large_dir, cfg["large_shape"])
    for key in ("toy", "large"):
        if key in ARGS.skip:
            continue
        models = toy_models if key == "toy" else {"policy": large_dir / "policy", "reward": large_dir / "reward"}
        spec = {
            "name": f"{key}-throughput",
            "policy": str(models["policy"]),
            "reward": str(models["reward"]),
            "prompts": str(toy / "prompts.jsonl"),
            "torch_threads": threads,
            **COMMON,
            **cfg[key],
        }
        n_params = {
            "policy": matmul_parameters(models["policy"], False),
            "reward": matmul_parameters(models["reward"], True),
        }
        n_params["value"] = n_params["reward"]
        if key == "toy":
            toy_json = json.loads((toy / "toy.json").read_text())
            n_params["policy_total"], n_params["reward_total"] = (
                toy_json["policy"]["parameters"],
                toy_json["reward"]["parameters"],
            )
        else:
            n_params["policy_total"], n_params["reward_total"] = (
                large_info["policy_parameters"],
                large_info["reward_parameters"],
            )
        mean_prompt = prompt_lengths(
            models["policy"], toy / "prompts.jsonl", spec["max_prompt_length"], spec["eval_size"]
        )
        size = throughput_size(key, spec, rounds, threads, n_params, mean_prompt, run_dir)
        goal = GOALS["toy_speedup" if key == "toy" else "large_speedup"]
        size["goals"] = {
            "speedup": size["ratios_median"]["episodes_per_s"] >= goal,
            "memory": size["ratios_median"]["peak_rss_train"] <= GOALS["memory_ratio"],
        }
        res["sizes"][key] = size
        if key == "large" and "memory" not in ARGS.skip:
            res["memory"] = memory_options(spec, threads, run_dir)
        (out_root / "latest.partial.json").write_text(json.dumps(res, indent=2, default=str) + "\n")

    if "parity" not in ARGS.skip:
        spec = {
            "name": "toy-parity",
            "policy": str(toy / "policy"),
            "reward": str(toy / "reward"),
            "prompts": str(toy / "prompts.jsonl"),
            "torch_threads": threads,
            **COMMON,
            **cfg["parity"],
        }
        par = parity(spec, cfg["parity_seeds"], threads, run_dir)
        for side_runs in par["runs"].values():
            for run in side_runs:
                run.pop("eval_oracle_values", None)
                run.pop("eval_rewards", None)
        (out_root / "parity.json").write_text(json.dumps(par, indent=1, default=str) + "\n")
        plot_parity(par, out_root / "parity.png")
        res["parity"] = {k: v for k, v in par.items() if k != "runs"}
        res["parity"]["curves"] = (
            "benchmarks/results/parity.json (per-update objective/scores, objective/kl, reward/oracle)"
        )

    if "orchestration" not in ARGS.skip:
        oc = cfg["orchestration"]
        res["orchestration"] = orchestration(toy, threads, oc["runs"], oc["total_episodes"], run_dir)

    y_after = yardstick(threads, cfg["yardstick_s"])
    res["yardstick"] = {
        "before": y_before,
        "after": y_after,
        "gflops": rnd(max(y_before["gflops_median"], y_after["gflops_median"]), 2),
        "note": "the machine's sustained rate: the higher of the before/after medians (the lower one "
        "shows contention from other jobs); MFU is measured against it",
    }
    for key, size in res["sizes"].items():
        for side in ("ours", "trl"):
            size[side]["mfu"] = rnd(size[side]["achieved_gflops"] / res["yardstick"]["gflops"], 4)
            size[side]["phase_mfu"] = {
                p: rnd(g / res["yardstick"]["gflops"], 4) if g is not None else None
                for p, g in size[side]["phase_gflops"].items()
            }
        size["ceiling"] = ceiling(size, res["yardstick"]["gflops"], GOALS[f"{key}_speedup"])
    res["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["duration_s"] = round(time.perf_counter() - began, 1)
    (out_root / "latest.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out_root / "latest.partial.json").unlink(missing_ok=True)
    table = markdown(res) if {"toy", "large"}.isdisjoint(ARGS.skip) else None
    if table is not None:
        if ARGS.quick:
            (out_root / "latest.md").write_text(table + "\n")
        else:
            inject_table(table)
    log(f"done in {res['duration_s'] / 60:.1f} min: {out_root / 'latest.json'}")
    if table:
        print(table)
    return 0


def smollm2(command: str) -> int:
    """SmolLM2-135M at 1 and 2 threads: benchmarks/results/smollm2_speed.json and its own table."""
    cfg = SMOL_QUICK if ARGS.quick else SMOL_FULL
    rounds = ARGS.rounds or cfg["rounds"]
    threads_list = [int(t) for t in (ARGS.smol_threads or cfg["threads"]).split(",")]
    world = ARGS.smol_world.resolve()
    missing = [p for p in ("policy/config.json", "reward/config.json", "prompts.jsonl") if not (world / p).is_file()]
    if missing:
        log(f"no SmolLM2 world in {world} (missing {', '.join(missing)}): build it with `make smol` (~30 min)")
        return 2
    began = time.perf_counter()
    out_root = (WORK / "quick") if ARGS.quick else RESULTS
    run_dir = WORK / "runs" / f"{dt.datetime.now():%Y%m%d-%H%M%S}-smollm2"
    run_dir.mkdir(parents=True, exist_ok=True)
    out_root.mkdir(parents=True, exist_ok=True)
    log(f"smollm2 speed, threads {threads_list}, {rounds} round(s); logs in {run_dir}")
    res: dict[str, Any] = {
        "benchmark": "smollm2-speed",
        "command": command,
        "quick": ARGS.quick,
        "rounds": rounds,
        "goals": SMOL_GOALS,
        "machine": machine_info(threads_list[0], ARGS.trl_python),
        "logs": str(run_dir.relative_to(REPO)),
    }
    res["machine"]["torch_threads"] = threads_list
    res["smollm2"] = smol_speed(world, cfg, threads_list, rounds, run_dir)
    res["machine"]["git_at_end"] = git_info()  # each child imports ppoflow afresh: an edit during the run shows here
    res["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["duration_s"] = round(time.perf_counter() - began, 1)
    (out_root / "smollm2_speed.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    table = smol_markdown(res)
    if ARGS.quick:
        (out_root / "smollm2_speed.md").write_text(table + "\n")
    else:
        inject_block(SMOL_MARK_START, SMOL_MARK_END, table)
    log(f"done in {res['duration_s'] / 60:.1f} min: {out_root / 'smollm2_speed.json'}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
