"""ppoflow side of the benchmark: one PPO run of ppoflow's engine from the same SPEC as trl_baseline.py.

Run it with the main venv's python (ppoflow must be importable):

    .venv/bin/python benchmarks/ppoflow_side.py --spec SPEC.json --out RESULT.json

It reads the same SPEC (benchmarks/README.md) and writes a RESULT with the same keys as the TRL baseline
(`timing_s.train_loop`, `throughput`, `memory`, `metrics`, `eval`, ...), measured the same way: the same
prompt selection (prompts longer than `max_prompt_length` tokens dropped, the last `eval_size` held out),
the same counting of response tokens on the policy's `generate()` output, the same RSS sampler, and the same
greedy evaluation on the held-out prompts (reward model at the last real token, the oracle on the decoded
completions).

The engine's stages 1-4 run untimed (configure, models, dataset, step-0 checkpoint, then the trainer is built
from it), exactly as `ppoflow train` does. The timed section is `PPOTrainer.train()`, up to the metrics of the
last update: the final checkpoint that `train()` always writes is timed separately (`timing_s.final_checkpoint`;
TRL saves nothing). Per-phase seconds come from the engine's own `timing/*` metrics.

`"oracle_per_update": true` in the SPEC adds its oracle as a weight-0 reward function, so each update's metrics carry
`reward/oracle` (learning curves); it costs a decode and an oracle call per update, so throughput runs leave it off.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for entry in (str(REPO_ROOT), str(HERE)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

import trl_baseline as tb  # noqa: E402  (stdlib-only at import time: the SPEC reader, RSS sampler, helpers)

# SPEC keys that are TRL-only and have no ppoflow meaning; they are accepted and listed in the RESULT.
TRL_ONLY_KEYS = {
    "num_sample_generations",
    "eval_batch_size",
    "eval_do_sample",
    "eval_temperature",
    "eval_seed",
    "rss_sample_interval_s",
    "name",
    "notes",
    "oracle_per_update",
    "batch_semantics",
    "torch_threads",
    "oracle",
    "prompts",
    "prompt_column",
    "eval_size",
    "max_prompt_length",
    "policy",
    "reward",
    "value",
    "ppoflow_overrides",
    "bf16",
}


def ppo_section(spec: dict[str, Any], ppo_fields: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The `ppo:` section for ppoflow: every SPEC key ppoflow's PPOConfig knows, as is (same names, same
    batch arithmetic as TRL 1.12). Other non-benchmark keys are returned as ignored."""
    if spec.get("batch_semantics", "trl") != "trl":
        raise tb.SpecError("ppoflow's batch arithmetic is TRL 1.12's: use batch_semantics 'trl' for both sides")
    ppo = {k: v for k, v in spec.items() if k in ppo_fields}
    ignored = sorted(k for k in spec if k not in ppo_fields and k not in TRL_ONLY_KEYS)
    ppo.setdefault("stop_token", "eos")
    if ppo.get("stop_token_id") is not None:
        ppo["stop_token"] = None
    ppo["checkpoint_every"] = 10**9  # only the final checkpoint (train() always writes it; timed apart)
    ppo["keep_checkpoints"] = 1
    return ppo, ignored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--workdir", type=Path, default=None, help="run workspace (default: a temp dir, removed)")
    args = parser.parse_args(argv)

    t_process = time.perf_counter()
    spec = tb.load_spec(args.spec)

    import numpy as np
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))

    import ppoflow
    from ppoflow import pipeline
    from ppoflow.checkpoint import newest_valid_checkpoint
    from ppoflow.config import PPOConfig as FlowPPOConfig
    from ppoflow.config import build_config
    from ppoflow.forwards import token_values
    from ppoflow.losses import response_mask
    from ppoflow.packing import padded_layout
    from ppoflow.rollout import left_pad
    from ppoflow.trainer import PPOTrainer

    oracle = tb.import_oracle(spec["oracle"]) if spec.get("oracle") else None

    # ---------- the same prompt selection as the TRL side ----------
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    prompts_all = tb.read_prompts(Path(spec["prompts"]), spec.get("prompt_column", "prompt"))
    max_len = int(spec["max_prompt_length"])
    kept = [(p, ids) for p in prompts_all if 0 < len(ids := tokenizer(p, padding=False)["input_ids"]) <= max_len]
    eval_size = int(spec["eval_size"])
    if eval_size >= len(kept):
        raise tb.SpecError(f"eval_size {eval_size} leaves no training prompts ({len(kept)} usable)")
    train_rows = kept[: len(kept) - eval_size] if eval_size else kept
    eval_rows = kept[len(kept) - eval_size :] if eval_size else []

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ppoflow-side-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    train_file = workdir / "train_prompts.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in train_rows))

    ppo, ignored = ppo_section(spec, set(FlowPPOConfig.model_fields))
    tree: dict[str, Any] = {
        "output_dir": str(workdir / "run"),
        "models": {
            "policy": spec["policy"],
            "reward": spec["reward"],
            "value": spec["value"],
            "dtype": "bfloat16" if spec.get("bf16") else "float32",
        },  # bf16: autocast over fp32 weights, as TRL's bf16
        "data": {"path": str(train_file), "prompt_column": "prompt", "max_prompt_length": max_len, "eval_size": 0},
        "ppo": ppo,
        "tracking": {"promotion": None},  # no held-out prompts (eval_size 0), and no registry: no gate
        "reward_functions": (
            [{"path": spec["oracle"], "name": "oracle", "weight": 0.0}]
            if (oracle and spec.get("oracle_per_update"))
            else []
        ),
    }
    config = build_config(tree, spec.get("ppoflow_overrides", []))  # `key.path=value`, ppoflow-only variants

    # ---------- stages 1-4 and the trainer (not timed as training) ----------
    probe = tb.RssSampler(1.0)  # not started: only its rss() reader
    rss_marks = {"after_imports_mib": tb.mib(probe.rss())}
    plan = pipeline.configure(config)
    models = pipeline.load_models(plan)
    data = pipeline.prepare_dataset(plan, models)
    prepare_s = time.perf_counter() - t0
    rss_marks["after_stages_1_3_mib"] = tb.mib(probe.rss())
    t0 = time.perf_counter()
    pipeline.init_trainer(plan, models, data)
    init_s = time.perf_counter() - t0
    gc.collect()
    rss_marks["after_step0_checkpoint_mib"] = tb.mib(probe.rss())
    t0 = time.perf_counter()
    step0, _ = newest_valid_checkpoint(plan.output_dir / "checkpoints")
    trainer = PPOTrainer.from_checkpoint(plan, models, data, checkpoint=step0)
    setup_s = time.perf_counter() - t0

    # ---------- instrumentation: the same generate() counting as the TRL side ----------
    stop_ids = torch.tensor(trainer.worker.stop_token_ids)
    counters = {
        "generate_calls": 0,
        "generate_s": 0.0,
        "generated_tokens": 0,
        "response_tokens": 0,
        "sequences": 0,
        "with_stop": 0,
        "counting": True,
    }
    policy = trainer.worker.policy
    original_generate = policy.generate  # the evaluation below generates uncounted
    tb.count_generate(policy, counters, trainer.worker.stop_token_ids)

    rows: list[dict[str, Any]] = []
    train_t0: list[float] = []

    def collect(metrics: dict[str, Any]) -> None:
        row = dict(metrics)
        row["bench/wall_s"] = round(time.perf_counter() - train_t0[0], 4)
        row["bench/cpu_s"] = round(time.process_time() - cpu_t0, 4)
        row["bench/response_tokens_cum"] = counters["response_tokens"]
        row["bench/generated_tokens_cum"] = counters["generated_tokens"]
        row["bench/optimizer_steps_cum"] = trainer.optimizer_steps
        rows.append(row)
        loop_peak[0] = max(loop_peak[0], sampler.peak, sampler.rss())

    # ---------- the timed training loop ----------
    gc.collect()
    sampler = tb.RssSampler(float(spec.get("rss_sample_interval_s", 0.05)))
    loop_peak = [0]  # peak up to the last update's metrics: the window throughput is timed over
    rss_before_train = sampler.rss()
    sampler.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cpu_t0 = time.process_time()
    train_t0.append(time.perf_counter())
    trainer.train([collect])
    train_call_s = time.perf_counter() - train_t0[0]
    train_cpu_s = rows[-1]["bench/cpu_s"] if rows else time.process_time() - cpu_t0
    peak_rss_with_checkpoint = sampler.stop()
    peak_rss_train = loop_peak[0] or peak_rss_with_checkpoint
    counters["counting"] = False
    rss_after_train = sampler.rss()
    train_s = rows[-1]["bench/wall_s"] if rows else train_call_s  # to the last update's metrics
    episodes = int(trainer.episode)
    n_updates = len(rows)

    # ---------- evaluation: the TRL side's (greedy by default, reward at the last real token, oracle) ----------
    t0 = time.perf_counter()
    eval_result: dict[str, Any] = {"size": len(eval_rows)}
    if eval_rows:
        trainer.policy.eval()
        reward_model = trainer.worker.reward
        device = trainer.accelerator.device
        do_sample = bool(spec.get("eval_do_sample", False))
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": config.ppo.response_length,
            "do_sample": do_sample,
            "eos_token_id": trainer.worker.stop_token_ids,
            "pad_token_id": models.pad_token_id,
        }
        if do_sample:
            gen_kwargs.update(
                temperature=float(spec.get("eval_temperature", config.ppo.temperature)) + 1e-7, top_k=0, top_p=1.0
            )
        gen_config = GenerationConfig(**gen_kwargs)
        torch.manual_seed(int(spec.get("eval_seed", config.ppo.seed)))
        bs = int(spec.get("eval_batch_size", 64))
        scores: list[float] = []
        completions: list[str] = []
        resp_tokens: list[int] = []
        has_stop: list[bool] = []
        with torch.no_grad():
            for i in range(0, len(eval_rows), bs):
                queries, query_mask = left_pad([ids for _, ids in eval_rows[i : i + bs]], models.pad_token_id, device)
                seqs = original_generate(
                    input_ids=queries, attention_mask=query_mask.long(), generation_config=gen_config
                )
                responses = seqs[:, queries.shape[1] :]
                mask = response_mask(responses, stop_ids)
                responses = responses.masked_fill(~mask, models.pad_token_id)
                layout = padded_layout(queries, query_mask, responses, mask)
                scores.extend(token_values(reward_model, layout.decoder_inputs(), layout.last).float().tolist())
                completions.extend(
                    tokenizer.decode(row[k].tolist(), skip_special_tokens=True)
                    for row, k in zip(responses, mask, strict=True)
                )
                resp_tokens.extend(mask.sum(1).tolist())
                has_stop.extend(torch.isin(responses, stop_ids.to(responses.device)).logical_and(mask).any(1).tolist())
        eval_prompts = [p for p, _ in eval_rows]
        eval_result.update(
            decoding="sample" if do_sample else "greedy",
            reward_mean=float(np.mean(scores)),
            reward_std=float(np.std(scores)),
            response_tokens_mean=float(np.mean(resp_tokens)),
            stop_rate=float(np.mean(has_stop)),
        )
        if oracle is not None:
            values = [float(v) for v in oracle(eval_prompts, completions)]
            eval_result.update(oracle=spec["oracle"], oracle_mean=float(np.mean(values)), oracle_values=values)
        eval_result.update(prompts=eval_prompts, completions=completions, rewards=scores)
    eval_s = time.perf_counter() - t0

    phase_keys = ("rollout", "policy", "ref", "value", "score", "train", "step")
    phases = {k: round(sum(r.get(f"timing/{k}", 0.0) for r in rows), 4) for k in phase_keys}
    phases["other"] = round(phases["step"] - sum(phases[k] for k in phase_keys if k != "step"), 4)
    result = {
        "benchmark": "ppoflow_side",
        "name": spec.get("name"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "ppoflow": getattr(ppoflow, "__version__", None) or importlib.metadata.version("ppoflow"),
            "accelerate": importlib.import_module("accelerate").__version__,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(trainer.accelerator.device),
            "dtype": str(trainer.worker.compute_dtype).removeprefix("torch."),
        },
        "spec": spec,
        "ppoflow_config": config.ppo.model_dump(mode="json"),
        "ignored_spec_keys": ignored,
        "derived": plan.batch.model_dump(),
        "data": {
            "prompts_read": len(prompts_all),
            "prompts_dropped_too_long": len(prompts_all) - len(kept),
            "train_prompts": len(train_rows),
            "eval_prompts": len(eval_rows),
            "max_prompt_length": max_len,
        },
        "timing_s": {
            "prepare": round(prepare_s, 3),
            "init_checkpoint": round(init_s, 3),
            "trainer_setup": round(setup_s, 3),
            "train_loop": round(train_s, 3),
            "train_call": round(train_call_s, 3),
            "train_loop_cpu": round(train_cpu_s, 3),
            "final_checkpoint": round(train_call_s - train_s, 3),
            "train_generate": round(counters["generate_s"], 3),
            "eval": round(eval_s, 3),
            "process_total": round(time.perf_counter() - t_process, 3),
        },
        "phases_s": phases,
        "throughput": {
            "updates": n_updates,
            "episodes": episodes,
            "episodes_per_s": episodes / train_s,
            "response_tokens": counters["response_tokens"],
            "response_tokens_per_s": counters["response_tokens"] / train_s,
            "generated_tokens": counters["generated_tokens"],
            "generated_tokens_per_s": counters["generated_tokens"] / train_s,
            "upper_bound_response_tokens_per_s": config.ppo.response_length * episodes / train_s,
            "stop_rate": counters["with_stop"] / max(1, counters["sequences"]),
            "optimizer_steps": trainer.optimizer_steps,
            "s_per_update": train_s / max(1, n_updates),
        },
        "memory": {
            "rss_before_train_mib": tb.mib(rss_before_train),
            "peak_rss_train_mib": tb.mib(peak_rss_train),
            "peak_rss_with_final_checkpoint_mib": tb.mib(peak_rss_with_checkpoint),
            "rss_after_train_mib": tb.mib(rss_after_train),
            "ru_maxrss_process_mib": tb.mib(tb.ru_maxrss_bytes()),
            "rss_samples": sampler.samples,
            "rss_marks": rss_marks,
            "cuda_max_allocated_mib": tb.mib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
        },
        "metrics": rows,
        "final_metrics": rows[-1] if rows else None,
        "eval": eval_result,
    }
    if tmp is not None:
        tmp.cleanup()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    t = result["throughput"]
    print(
        f"ppoflow_side: {episodes} episodes in {train_s:.2f}s = {t['episodes_per_s']:.2f} ep/s, "
        f"{t['response_tokens_per_s']:.1f} response tok/s, peak RSS {result['memory']['peak_rss_train_mib']} MiB; "
        f"eval reward {eval_result.get('reward_mean')}; wrote {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tb.SpecError as exc:
        print(f"ppoflow_side: spec error: {exc}", file=sys.stderr)
        sys.exit(2)
