"""TRL baseline for the ppoflow benchmark: one PPO run with TRL 1.12.0's `trl.experimental.ppo.PPOTrainer`.

Run it with the bench venv's python (built by `make bench-venv`, see benchmarks/README.md):

    .venv-bench/bin/python benchmarks/trl_baseline.py --spec SPEC.json --out RESULT.json

TRL is only called as a library here. The SPEC and RESULT schemas are described in benchmarks/README.md.
Everything runs in fp32 on the accelerator TRL picks (the CPU on our machines); nothing is saved and nothing
is reported to a tracker. The timed section is `trainer.train()` alone: model loading, tokenization, trainer
construction and the final evaluation are timed separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib
import inspect
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Offline by default: nothing may be downloaded from a hub, and no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]

# SPEC keys this script consumes itself (everything else must be a PPOConfig field).
OWN_KEYS = {
    "policy",
    "reward",
    "value",
    "prompts",
    "prompt_column",
    "eval_size",
    "max_prompt_length",
    "oracle",
    "batch_semantics",
    "torch_threads",
    "eval_batch_size",
    "eval_do_sample",
    "eval_temperature",
    "eval_seed",
    "rss_sample_interval_s",
    "name",
    "notes",
    "oracle_per_update",
}
# PPOConfig fields the benchmark fixes; a SPEC may not change them.
FIXED_CONFIG = {
    "fp16": False,
    "report_to": "none",
    "save_strategy": "no",
    "eval_strategy": "no",
    "push_to_hub": False,
    "logging_steps": 1,
    "disable_tqdm": True,
}
# PPOConfig fields the benchmark sets unless the SPEC says otherwise.
DEFAULT_CONFIG = {
    "num_sample_generations": 0,  # TRL's periodic sample tables: extra generation inside the timed loop
    "stop_token": "eos",
    "bf16": False,  # True: accelerate's bf16 autocast over fp32 weights (gpu_check.py's throughput check)
}


class SpecError(ValueError):
    pass


def load_spec(path: Path) -> dict[str, Any]:
    spec = json.loads(path.read_text())
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: the spec must be a JSON object")
    for key in ("policy", "reward", "prompts"):
        if key not in spec:
            raise SpecError(f"{path}: `{key}` is required")
    base = path.resolve().parent
    for key in ("policy", "reward", "value", "prompts"):
        if spec.get(key):
            p = Path(spec[key]).expanduser()
            spec[key] = str(p if p.is_absolute() else (base / p))
    spec.setdefault("value", spec["reward"])
    spec.setdefault("eval_size", 0)
    spec.setdefault("max_prompt_length", 64)
    spec.setdefault("batch_semantics", "trl")
    if spec.get("stop_token_id") is not None and "stop_token" not in spec:
        spec["stop_token"] = None
    return spec


def map_batch_semantics(spec: dict[str, Any]) -> dict[str, Any]:
    """Return the TRL batch arguments for the SPEC.

    "trl" (default): the SPEC's per_device_train_batch_size / gradient_accumulation_steps / num_mini_batches are
    passed to TRL as they are. TRL 1.12 derives: rollout batch = per_device * grad_accum (* world size), mini-batch =
    rollout batch / num_mini_batches, and forwards micro-batches of min(per_device, mini-batch).

    "ppoflow": the SPEC uses ppoflow's arithmetic (mini-batch = per_device * grad_accum, rollout batch = mini-batch *
    num_mini_batches, one optimizer step per mini-batch); it is translated to the TRL arguments that give the same
    rollout batch, mini-batches, micro-batches and optimizer steps. That translation exists when grad_accum == 1 or
    num_mini_batches == 1 only (otherwise TRL's accelerate accumulation spans several mini-batches).
    """
    pd = int(spec.get("per_device_train_batch_size", 8))
    ga = int(spec.get("gradient_accumulation_steps", 1))
    nmb = int(spec.get("num_mini_batches", 1))
    mode = spec["batch_semantics"]
    if mode == "trl":
        return {"per_device_train_batch_size": pd, "gradient_accumulation_steps": ga, "num_mini_batches": nmb}
    if mode != "ppoflow":
        raise SpecError(f"batch_semantics must be 'trl' or 'ppoflow', got {mode!r}")
    if ga == 1:
        return {"per_device_train_batch_size": pd * nmb, "gradient_accumulation_steps": 1, "num_mini_batches": nmb}
    if nmb == 1:
        return {"per_device_train_batch_size": pd, "gradient_accumulation_steps": ga, "num_mini_batches": 1}
    raise SpecError(
        "batch_semantics='ppoflow' with gradient_accumulation_steps > 1 and num_mini_batches > 1 has no TRL 1.12 "
        "equivalent (TRL accumulates gradient_accumulation_steps micro-batch calls across mini-batch boundaries)"
    )


class RssSampler(threading.Thread):
    """Samples this process's RSS to get the peak during one phase (ru_maxrss is the lifetime peak)."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:  # pragma: no cover - psutil comes with accelerate
            self._proc = None

    def rss(self) -> int:
        if self._proc is not None:
            return self._proc.memory_info().rss
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.rss())
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self.rss())
        return self.peak


def count_generate(model, counters: dict[str, Any], stop_ids: list[int] | None, on_output=None) -> None:
    """Wrap `model.generate` to count its output the same way on both sides of the benchmark (while
    `counters["counting"]`): calls and seconds, positions generated (incl. padding after an early stop),
    sequences, sequences with a stop token, and response tokens up to and including the first stop token
    (every position when there is no stop token). `on_output(queries, new_tokens, lengths)` sees each output."""
    import torch

    original_generate = model.generate
    stops = None if stop_ids is None else torch.tensor(stop_ids)

    def counting_generate(*g_args, **g_kwargs):
        t = time.perf_counter()
        out = original_generate(*g_args, **g_kwargs)
        if counters["counting"]:
            counters["generate_s"] += time.perf_counter() - t
            counters["generate_calls"] += 1
            queries = g_kwargs["input_ids"] if "input_ids" in g_kwargs else g_args[0]
            seqs = out.sequences if hasattr(out, "sequences") else out
            new = seqs[:, queries.shape[1] :]
            counters["generated_tokens"] += new.numel()
            counters["sequences"] += new.shape[0]
            lengths = torch.full((new.shape[0],), new.shape[1], dtype=torch.long, device=new.device)
            if stops is not None and new.shape[1] > 0:
                is_stop = torch.isin(new, stops.to(new.device))
                has = is_stop.any(dim=1)
                lengths = torch.where(has, is_stop.int().argmax(dim=1) + 1, lengths)
                counters["with_stop"] += int(has.sum())
            counters["response_tokens"] += int(lengths.sum())
            if on_output is not None:
                on_output(queries, new, lengths)
        return out

    model.generate = counting_generate


def mib(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def read_prompts(path: Path, column: str) -> list[str]:
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if column not in row:
                    raise SpecError(f"{path}:{n}: no `{column}` field")
                prompts.append(row[column])
    return prompts


def import_oracle(target: str):
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise SpecError(f"oracle must look like `module:function`, got {target!r}")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    t_process = time.perf_counter()
    spec = load_spec(args.spec)

    import numpy as np
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        GenerationConfig,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo.ppo_trainer import batch_generation, truncate_response
    from trl.experimental.utils import get_reward

    oracle = import_oracle(spec["oracle"]) if spec.get("oracle") else None  # fail before any training

    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))

    # ---------- PPOConfig from the SPEC ----------
    config_fields = {f.name for f in dataclasses.fields(PPOConfig)}
    unknown = sorted(k for k in spec if k not in OWN_KEYS and k not in config_fields)
    if unknown:
        raise SpecError(f"unknown SPEC keys (neither benchmark keys nor PPOConfig fields): {unknown}")
    fixed_clash = sorted(k for k in spec if k in FIXED_CONFIG and spec[k] != FIXED_CONFIG[k])
    if fixed_clash:
        raise SpecError(f"SPEC may not change {fixed_clash}: the benchmark fixes {FIXED_CONFIG}")
    config_kwargs: dict[str, Any] = dict(DEFAULT_CONFIG)
    config_kwargs.update({k: v for k, v in spec.items() if k in config_fields})
    config_kwargs.update(map_batch_semantics(spec))
    config_kwargs.update(FIXED_CONFIG)
    if config_kwargs.get("stop_token_id") is not None:
        config_kwargs["stop_token"] = None
    if config_kwargs["bf16"] and not torch.cuda.is_available():
        config_kwargs["use_cpu"] = True  # transformers refuses bf16 without a GPU unless told it is meant for the CPU
    out_dir = tempfile.mkdtemp(prefix="trl-baseline-")
    config_kwargs["output_dir"] = out_dir
    config = PPOConfig(**config_kwargs)
    seed = config.seed
    transformers.set_seed(seed)  # PPOTrainer.__init__ never calls Trainer.__init__, so nothing else seeds numpy

    # ---------- models and tokenizer (not timed as training) ----------
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    if tokenizer.pad_token_id is None:
        raise SpecError("the policy tokenizer has no pad token; TRL's PPO needs one (and pad != eos)")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        print(
            "WARNING: pad == eos: TRL truncates responses with pad and finds their ends by the first pad",
            file=sys.stderr,
        )
    dtype = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=dtype)
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=dtype)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward"], dtype=dtype, num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["value"], dtype=dtype, num_labels=1)
    for m in (policy, ref_policy, reward_model, value_model):
        if m.config.pad_token_id is None:
            m.config.pad_token_id = tokenizer.pad_token_id
    load_s = time.perf_counter() - t0

    # ---------- prompts: drop too-long ones, hold out the last eval_size ----------
    t0 = time.perf_counter()
    prompts_all = read_prompts(Path(spec["prompts"]), spec.get("prompt_column", "prompt"))
    max_len = int(spec["max_prompt_length"])
    kept: list[tuple[str, list[int]]] = []
    for p in prompts_all:
        ids = tokenizer(p, padding=False)["input_ids"]
        if 0 < len(ids) <= max_len:
            kept.append((p, ids))
    eval_size = int(spec["eval_size"])
    if eval_size >= len(kept):
        raise SpecError(f"eval_size {eval_size} leaves no training prompts ({len(kept)} usable)")
    train_rows = kept[: len(kept) - eval_size] if eval_size else kept
    eval_rows = kept[len(kept) - eval_size :] if eval_size else []
    local_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if len(train_rows) < local_batch:
        # TRL's dataloader uses drop_last=True and repeats forever: fewer prompts than a batch would hang.
        raise SpecError(f"{len(train_rows)} training prompts < one TRL rollout batch of {local_batch}")
    train_dataset = Dataset.from_dict({"input_ids": [ids for _, ids in train_rows]})
    tokenize_s = time.perf_counter() - t0

    # ---------- instrumentation ----------
    stop_id_for_count = tokenizer.eos_token_id if config.stop_token == "eos" else config.stop_token_id
    counters = {
        "generate_calls": 0,
        "generate_s": 0.0,
        "generated_tokens": 0,
        "response_tokens": 0,
        "sequences": 0,
        "with_stop": 0,
        "optimizer_steps": 0,
        "counting": True,
    }
    # Optional learning curve of the oracle: the rollout completions of each update, scored by the oracle
    # (a decode and an oracle call per update inside the timed loop: for learning runs, not throughput runs).
    oracle_per_update = bool(spec.get("oracle_per_update")) and oracle is not None
    oracle_acc = {"sum": 0.0, "n": 0}

    def score_with_oracle(queries, new, lengths) -> None:
        texts = [
            tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True)
            for row, n in zip(new, lengths, strict=True)
        ]
        values = oracle(tokenizer.batch_decode(queries, skip_special_tokens=True), texts)
        oracle_acc["sum"] += float(sum(values))
        oracle_acc["n"] += len(values)

    count_generate(
        policy,
        counters,
        None if stop_id_for_count is None else [stop_id_for_count],
        score_with_oracle if oracle_per_update else None,
    )

    logs: list[dict[str, Any]] = []  # one row per TRL log call (one per update: logging_steps=1)
    train_t0: list[float] = []

    class LogCollector(TrainerCallback):
        def on_log(self, cb_args, state, control, logs=None, **kwargs):
            if logs:
                row = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in logs.items()}
                row["bench/update"] = state.global_step
                row["bench/wall_s"] = round(time.perf_counter() - train_t0[0], 4) if train_t0 else None
                row["bench/response_tokens_cum"] = counters["response_tokens"]
                row["bench/generated_tokens_cum"] = counters["generated_tokens"]
                row["bench/optimizer_steps_cum"] = counters["optimizer_steps"]
                if oracle_per_update and oracle_acc["n"]:
                    row["reward/oracle"] = oracle_acc["sum"] / oracle_acc["n"]
                    oracle_acc.update(sum=0.0, n=0)
                if phase_train_start:  # the training phase of this update: first grad forward -> this log call
                    phase_s["train"] += time.perf_counter() - phase_train_start.pop()
                    phase_train_start.clear()
                row["bench/phases_cum_s"] = {
                    "rollout": round(counters["generate_s"], 4),
                    **{k: round(v, 4) for k, v in phase_s.items()},
                }
                collected.append(row)

    collected = logs  # `logs` is on_log's own argument name inside the callback

    t0 = time.perf_counter()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=train_dataset,
        value_model=value_model,
        eval_dataset=None,
        callbacks=[LogCollector()],
    )
    setup_s = time.perf_counter() - t0

    # Per-phase seconds of the rollout and training, from forward hooks (like ppoflow's timing/* metrics):
    # ref = reference forward; value / score = value / reward backbone forwards under no_grad (rollout);
    # train = from the first grad-enabled forward of the policy+value wrapper in an update to its log call.
    # TRL takes the rollout log-probs from generate()'s scores, so it has no separate policy forward.
    phase_s = {"ref": 0.0, "value": 0.0, "score": 0.0, "train": 0.0}
    phase_train_start: list[float] = []

    def time_forwards(module, key):
        starts: list[float | None] = []

        def pre(_mod, _inp):
            starts.append(time.perf_counter() if counters["counting"] and not torch.is_grad_enabled() else None)

        def post(_mod, _inp, _out):
            began = starts.pop()
            if began is not None:
                phase_s[key] += time.perf_counter() - began

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def mark_train_start(_mod, _inp):
        if counters["counting"] and torch.is_grad_enabled() and not phase_train_start:
            phase_train_start.append(time.perf_counter())

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ref_model is not None:
        time_forwards(trainer.ref_model, "ref")
    time_forwards(getattr(unwrapped.value_model, unwrapped.value_model.base_model_prefix), "value")
    time_forwards(getattr(trainer.reward_model, trainer.reward_model.base_model_prefix), "score")
    unwrapped.register_forward_pre_hook(mark_train_start)

    # Count real optimizer steps (accelerate skips `optimizer.step()` while accumulating).
    inner_opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    inner_opt.register_step_post_hook(
        lambda *a, **k: counters.__setitem__("optimizer_steps", counters["optimizer_steps"] + 1)
    )

    # ---------- the timed training loop ----------
    gc.collect()
    sampler = RssSampler(float(spec.get("rss_sample_interval_s", 0.05)))
    rss_before_train = sampler.rss()
    sampler.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cpu_t0 = time.process_time()
    train_t0.append(time.perf_counter())
    trainer.train()
    train_s = time.perf_counter() - train_t0[0]
    train_cpu_s = time.process_time() - cpu_t0
    peak_rss_train = sampler.stop()
    counters["counting"] = False
    rss_after_train = sampler.rss()

    episodes = int(trainer.state.episode)
    n_updates = int(config.num_total_batches)

    # ---------- evaluation on the held-out prompts ----------
    t0 = time.perf_counter()
    eval_result: dict[str, Any] = {"size": len(eval_rows)}
    if eval_rows:
        trained = trainer.accelerator.unwrap_model(trainer.model).policy
        trained.eval()
        device = trainer.accelerator.device
        do_sample = bool(spec.get("eval_do_sample", False))
        gen_kwargs: dict[str, Any] = {"max_new_tokens": config.response_length, "do_sample": do_sample}
        if do_sample:
            gen_kwargs.update(
                temperature=float(spec.get("eval_temperature", config.temperature)) + 1e-7, top_k=0, top_p=1.0
            )
        gen_config = GenerationConfig(**gen_kwargs)
        torch.manual_seed(int(spec.get("eval_seed", seed)))
        bs = int(spec.get("eval_batch_size", 64))
        stop_id = trainer.stop_token_id
        pad_id = tokenizer.pad_token_id
        scores: list[float] = []
        completions: list[str] = []
        resp_tokens: list[int] = []
        has_stop: list[bool] = []
        with torch.no_grad():
            for i in range(0, len(eval_rows), bs):
                chunk = eval_rows[i : i + bs]
                queries = tokenizer.pad({"input_ids": [ids for _, ids in chunk]}, return_tensors="pt")["input_ids"]
                queries = queries.to(device)
                context_length = queries.shape[1]
                query_responses, _ = batch_generation(trained, queries, bs, pad_id, gen_config)
                response = query_responses[:, context_length:]
                post = truncate_response(stop_id, pad_id, response) if stop_id is not None else response
                _, score, _ = get_reward(trainer.reward_model, torch.cat((queries, post), 1), pad_id, context_length)
                scores.extend(score.float().view(-1).tolist())
                completions.extend(tokenizer.batch_decode(post, skip_special_tokens=True))
                resp_tokens.extend((post != pad_id).sum(dim=1).tolist())
                if stop_id is not None:
                    has_stop.extend((post == stop_id).any(dim=1).tolist())
        eval_prompts = [p for p, _ in eval_rows]
        eval_result.update(
            decoding="sample" if do_sample else "greedy",
            reward_mean=float(np.mean(scores)),
            reward_std=float(np.std(scores)),
            response_tokens_mean=float(np.mean(resp_tokens)),
            stop_rate=float(np.mean(has_stop)) if has_stop else None,
        )
        if oracle is not None:
            values = [float(v) for v in oracle(eval_prompts, completions)]
            try:  # the oracle's code identifies what it scored (it lives in the working tree)
                oracle_src = inspect.getsource(sys.modules[oracle.__module__])
                oracle_sha = hashlib.sha256(oracle_src.encode()).hexdigest()[:16]
            except (OSError, TypeError, KeyError):
                oracle_sha = None
            eval_result.update(
                oracle=spec["oracle"],
                oracle_module_sha256=oracle_sha,
                oracle_mean=float(np.mean(values)),
                oracle_values=values,
            )
        eval_result.update(prompts=eval_prompts, completions=completions, rewards=scores)
    eval_s = time.perf_counter() - t0

    # ---------- quirks read off the installed TRL, not assumed ----------
    train_src = inspect.getsource(PPOTrainer.train)
    sched = trainer.lr_scheduler
    opt_defaults = {  # lr and weight_decay are per param group (below), not these constructor defaults
        k: v
        for k, v in inner_opt.defaults.items()
        if isinstance(v, (int, float, bool, str, tuple)) and k not in ("lr", "weight_decay")
    }
    opt_groups = [
        {
            "params": sum(p.numel() for p in g["params"]),
            "weight_decay": g.get("weight_decay"),
            "eps": g.get("eps"),
            "betas": g.get("betas"),
        }
        for g in inner_opt.param_groups
    ]
    result = {
        "benchmark": "trl_baseline",
        "name": spec.get("name"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "accelerate": importlib.import_module("accelerate").__version__,
            "datasets": importlib.import_module("datasets").__version__,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(trainer.accelerator.device),
            "dtype": "bfloat16" if config.bf16 else "float32",
        },
        "spec": spec,
        "trl_config": {
            k: getattr(config, k, None)
            for k in (
                "total_episodes",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "num_ppo_epochs",
                "num_mini_batches",
                "local_rollout_forward_batch_size",
                "response_length",
                "stop_token",
                "stop_token_id",
                "temperature",
                "missing_eos_penalty",
                "kl_coef",
                "kl_estimator",
                "cliprange",
                "vf_coef",
                "cliprange_value",
                "gamma",
                "lam",
                "whiten_rewards",
                "learning_rate",
                "max_grad_norm",
                "lr_scheduler_type",
                "warmup_ratio",
                "weight_decay",
                "adam_epsilon",
                "optim",
                "seed",
                "num_sample_generations",
                "gradient_checkpointing",
                "bf16",
            )
        },
        "derived": {
            "world_size": config.world_size,
            "local_batch_size": config.local_batch_size,
            "batch_size": config.batch_size,
            "micro_batch_size": config.micro_batch_size,
            "local_mini_batch_size": config.local_mini_batch_size,
            "mini_batch_size": config.mini_batch_size,
            "forward_micro_batch": min(config.per_device_train_batch_size, config.local_mini_batch_size),
            "num_total_batches": n_updates,
            "stop_token_id_used": trainer.stop_token_id,
        },
        "data": {
            "prompts_read": len(prompts_all),
            "prompts_dropped_too_long": len(prompts_all) - len(kept),
            "train_prompts": len(train_rows),
            "eval_prompts": len(eval_rows),
            "max_prompt_length": max_len,
        },
        "timing_s": {
            "load_models": round(load_s, 3),
            "tokenize": round(tokenize_s, 3),
            "trainer_setup": round(setup_s, 3),
            "train_loop": round(train_s, 3),
            "train_loop_cpu": round(train_cpu_s, 3),
            "train_generate": round(counters["generate_s"], 3),
            "eval": round(eval_s, 3),
            "process_total": round(time.perf_counter() - t_process, 3),
        },
        "phases_s": {
            "rollout": round(counters["generate_s"], 4),
            "policy": 0.0,
            **{k: round(v, 4) for k, v in phase_s.items()},
            "step": round(train_s, 4),
            "other": round(train_s - counters["generate_s"] - sum(phase_s.values()), 4),
            "notes": "rollout = generate(); ref/value/score = no-grad forwards of the reference, value and reward "
            "backbones; train = first grad forward of an update to its log call; other = the rest "
            "(log-probs from scores, GAE, whitening, gc.collect, empty_cache); policy = 0 (log-probs come "
            "from generate()'s scores).",
        },
        "throughput": {
            "updates": n_updates,
            "episodes": episodes,
            "episodes_per_s": episodes / train_s,
            "response_tokens": counters["response_tokens"],
            "response_tokens_per_s": counters["response_tokens"] / train_s,
            "generated_tokens": counters["generated_tokens"],
            "generated_tokens_per_s": counters["generated_tokens"] / train_s,
            "upper_bound_response_tokens_per_s": config.response_length * episodes / train_s,
            "stop_rate": counters["with_stop"] / max(1, counters["sequences"]),
            "optimizer_steps": counters["optimizer_steps"],
            "s_per_update": train_s / max(1, n_updates),
            "notes": "response_tokens: tokens up to and including the first stop token (all tokens if none), as "
            "counted on the policy's generate() output during train(); generated_tokens: every position "
            "generate() produced, including padding after sequences that stopped early; "
            "upper_bound_*: response_length * episodes / train_loop seconds.",
        },
        "memory": {
            "rss_before_train_mib": mib(rss_before_train),
            "peak_rss_train_mib": mib(peak_rss_train),
            "rss_after_train_mib": mib(rss_after_train),
            "ru_maxrss_process_mib": mib(ru_maxrss_bytes()),
            "rss_samples": sampler.samples,
            "cuda_max_allocated_mib": mib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
        },
        "metrics": logs,
        "final_metrics": logs[-1] if logs else None,
        "eval": eval_result,
        "trl_quirks": {
            "max_grad_norm_honoured": "clip_grad" in train_src,
            # PPOTrainer never calls Trainer.__init__/_inner_training_loop, which would enable it
            "gradient_checkpointing_applied": bool(getattr(trainer.policy_model, "is_gradient_checkpointing", False)),
            "gc_collect_calls_per_update": train_src.count("gc.collect()"),
            "empty_cache_calls_in_train": train_src.count("empty_cache()"),
            "lr_scheduler": type(sched).__name__ if sched is not None else None,
            "lr_first_last": [logs[0].get("lr"), logs[-1].get("lr")] if logs else None,
            "optimizer": type(inner_opt).__name__,
            "optimizer_defaults": opt_defaults,
            "optimizer_param_groups": opt_groups,
            "tokenizer_padding_side": tokenizer.padding_side,
            "episodes_trained_vs_requested": [episodes, config.total_episodes],
        },
    }
    shutil.rmtree(out_dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    t = result["throughput"]
    print(
        f"trl_baseline: {episodes} episodes in {train_s:.2f}s = {t['episodes_per_s']:.2f} ep/s, "
        f"{t['response_tokens_per_s']:.1f} response tok/s (upper bound {t['upper_bound_response_tokens_per_s']:.1f}), "
        f"peak RSS {result['memory']['peak_rss_train_mib']} MiB; eval reward "
        f"{eval_result.get('reward_mean')}; wrote {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpecError as exc:
        print(f"trl_baseline: spec error: {exc}", file=sys.stderr)
        sys.exit(2)
