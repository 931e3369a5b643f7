"""How fast can SmolLM2-135M decode on this CPU? The evidence behind #26's speed goal.

`make bench-smol-speed` finds ppoflow's generation at about a fifth of the memory-read limit (each decoding
step of 8 sequences reads all 538 MB of fp32 weights once). This script asks whether any kernel at hand
does better, for the bench's shape (batch 8, a 40-token prompt, then one token a step), each variant in a
fresh process on the given threads:

- `eager`: the model's own forward with a dynamic KV cache, as `generate` runs it (ppoflow and TRL alike);
- `w_xt`: the same with every `nn.Linear` computed as `W @ x.T` (another GEMM layout for 8 rows);
- `compile` / `compile_max_autotune`: `torch.compile` of the decoding step over a static KV cache
  (inductor's fused kernels; max-autotune also tries its own C++ GEMM templates), compile time reported;
- `gemm_torch` / `gemm_w_xt` / `gemm_numpy`: the step's matmuls alone (30 layers' own weights and the LM
  head, so they stream from memory as in the model): torch's MKL, the `W @ x.T` layout, and numpy's OpenBLAS.

Each reports the median milliseconds per step and the GB/s of weights that implies, beside this machine's
memory-read rate (`make bench`'s yardstick) and the step's limit at that rate. Writes one JSON file:

    .venv/bin/python benchmarks/decode_kernels.py --policy .ppoflow/smol/policy --threads 1,2 \\
        --out benchmarks/results/decode_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import bandwidth

VARIANTS = ("eager", "w_xt", "compile", "compile_max_autotune", "gemm_torch", "gemm_w_xt", "gemm_numpy")
BATCH, PROMPT, STEPS = 8, 40, 31


def weight_bytes(model) -> int:
    """Bytes of the `nn.Linear` weights one decoding step reads (the tied LM head once)."""
    import torch

    seen = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sum(w.numel() * w.element_size() for w in seen.values())


def as_w_xt(module, x):
    """`nn.Linear` for one decoding row per sequence as `W @ x.T` (the usual path otherwise)."""
    import torch

    if x.dim() == 3 and x.shape[1] == 1:
        out = (module.weight @ x.reshape(-1, x.shape[-1]).t()).t().reshape(x.shape[0], 1, -1)
        return out if module.bias is None else out + module.bias
    return torch.nn.functional.linear(x, module.weight, module.bias)


def decode_steps(model, variant: str) -> tuple[list[float], float]:
    """Seconds of each decoding step after a prefill, and the seconds the first call took (compiling)."""
    import torch
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(0, model.config.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    if variant.startswith("compile"):
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + STEPS + 1)

        def step(token, position):
            return model(
                input_ids=token,
                position_ids=position.expand(BATCH, 1),
                cache_position=position[0],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits

        mode = "max-autotune-no-cudagraphs" if variant == "compile_max_autotune" else None
        step = torch.compile(step, mode=mode, dynamic=False)
        model(
            input_ids=ids, cache_position=torch.arange(PROMPT), past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        began = time.perf_counter()
        step(ids[:, -1:], torch.tensor([[PROMPT]]))
        first = time.perf_counter() - began
        times = []
        for offset in range(1, STEPS + 1):
            began = time.perf_counter()
            step(ids[:, -1:], torch.tensor([[PROMPT + offset]]))
            times.append(time.perf_counter() - began)
        return times, first
    cache = DynamicCache(config=model.config)
    mask = torch.ones_like(ids)
    model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(STEPS):
        mask = torch.cat([mask, mask.new_ones(BATCH, 1)], dim=1)
        began = time.perf_counter()
        model(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - began)
    return times, times[0]


def gemm_steps(model, variant: str) -> list[float]:
    """Seconds of one step's matmuls alone (8 rows through every `nn.Linear` weight), 10 repeats."""
    import torch

    weights = list(
        {id(m.weight): m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)}.values()
    )
    rows = {w.shape[1]: torch.randn(BATCH, w.shape[1]) for w in weights}
    if variant == "gemm_numpy":
        arrays = [w.numpy() for w in weights]
        np_rows = {k: v.numpy() for k, v in rows.items()}

        def one():
            for w in arrays:
                np_rows[w.shape[1]] @ w.T
    elif variant == "gemm_w_xt":

        def one():
            for w in weights:
                w @ rows[w.shape[1]].t()
    else:

        def one():
            for w in weights:
                torch.nn.functional.linear(rows[w.shape[1]], w)

    one()
    times = []
    for _ in range(10):
        began = time.perf_counter()
        one()
        times.append(time.perf_counter() - began)
    return times


def child(policy: Path, variant: str, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    if variant == "w_xt":
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = as_w_xt.__get__(module)
    with torch.no_grad():
        if variant.startswith("gemm"):
            times, first = gemm_steps(model, variant), None
        else:
            times, first = decode_steps(model, variant)
    step = statistics.median(times)
    return {
        "variant": variant,
        "threads": threads,
        "ms_per_step": round(1000 * step, 1),
        "weights_gbs": round(weight_bytes(model) / step / 1e9, 1),
        "first_call_s": None if first is None else round(first, 1),
    }


def one_thread_count(policy: Path, threads: int, variants: list[str]) -> dict:
    """Every variant in its own process on `threads` threads, then the memory-read yardstick."""
    # inductor's caches off: the compile time is a first compile's, as a fresh machine's would be
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
    }
    rows = []
    for variant in variants:
        out = subprocess.run(
            [sys.executable, __file__, "--policy", str(policy), "--threads", str(threads), "--child", variant],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    read = bandwidth(threads, 2.0)["read"]["gbs_median"]
    step_gb = rows[0]["weights_gbs"] * rows[0]["ms_per_step"] / 1000
    return {"read_gbs": round(read, 1), "step_limit_ms": round(1000 * step_gb / read, 1), "variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, help="SmolLM2's directory (default: converted from the GGUF)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.policy, args.child, int(args.threads))))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        policy = args.policy
        if policy is None:
            from ppoflow.smol.convert import convert

            policy = Path(scratch) / "policy"
            convert(policy)
        by_threads = {
            threads: one_thread_count(policy, int(threads), args.variants.split(","))
            for threads in args.threads.split(",")
        }
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"batch": BATCH, "prompt": PROMPT, "steps": STEPS},
        "threads": by_threads,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
