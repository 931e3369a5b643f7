"""ppoflow's own toy speed at several commits, side by side: where did episodes/s go?

    .venv/bin/python benchmarks/commits.py --commits c4003a0 HEAD --rounds 3 --toy .ppoflow/bench/toy

Each commit is checked out in a git worktree (under .ppoflow/bench/commits/) and its own
benchmarks/ppoflow_side.py runs with that worktree first on PYTHONPATH, so the engine measured is
the commit's, the installed packages this machine's. Rounds alternate the order of the commits (so
a machine that slows down over the run does not favour the first), on the shapes asked for:

- `toy`: make bench's toy shape (batch 64, 4 mini-batches, 4 epochs, 32-token responses): training-bound.
- `light`: 1 epoch of 1 mini-batch, 16-token responses: rollout and per-update overheads weigh more.

Numbers from different days are not comparable on these machines (the same code measured 44.6 and
38.8 episodes/s on two days): only a side-by-side run answers "did it get slower". The result, with
per-phase seconds per update, goes to benchmarks/results/commits.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from run import COMMON, FULL, REPO, RESULTS, WORK, child_env, git_info, log

SHAPES = {
    "toy": FULL["toy"],
    "light": {**FULL["toy"], "num_ppo_epochs": 1, "num_mini_batches": 1, "response_length": 16, "total_episodes": 640},
}


def worktree(commit: str) -> tuple[str, Path]:
    """(full hash, a worktree of it): made once, reused."""
    full = subprocess.run(
        ["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    path = WORK / "commits" / full[:12]
    if not (path / "ppoflow").is_dir():
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(path), full], cwd=REPO, check=True)
    return full, path


def measure(path: Path, spec: Path, out: Path, threads: int) -> dict[str, Any]:
    env = child_env(threads) | {"PYTHONPATH": str(path)}
    process = subprocess.run(
        [sys.executable, "benchmarks/ppoflow_side.py", "--spec", str(spec), "--out", str(out)],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
    )
    if process.returncode != 0:
        raise SystemExit(f"{path.name}: ppoflow_side failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
    result = json.loads(out.read_text())
    steps = result["throughput"]["updates"]
    return {
        "episodes_per_s": round(result["throughput"]["episodes_per_s"], 3),
        "s_per_update": {key: round(value / steps, 4) for key, value in result["phases_s"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", nargs="+", required=True, help="commits, tags or branches (HEAD included)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["toy", "light"])
    parser.add_argument("--toy", type=Path, default=WORK / "toy", help="a toy world (ppoflow toy --out DIR)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "commits.json")
    args = parser.parse_args(argv)

    toy = args.toy.resolve()
    trees = dict(worktree(commit) for commit in args.commits)
    runs = WORK / "commits" / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    began = time.time()
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "git": git_info(),
        "threads": args.threads,
        "rounds": args.rounds,
        "commits": {full[:12]: name for name, full in zip(args.commits, trees, strict=True)},
        "shapes": {},
    }
    for shape in args.shapes:
        spec = {
            "name": f"commits-{shape}",
            "policy": str(toy / "policy"),
            "reward": str(toy / "reward"),
            "prompts": str(toy / "prompts.jsonl"),
            "torch_threads": args.threads,
            **COMMON,
            **SHAPES[shape],
        }
        spec_path = runs / f"{shape}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        measured: dict[str, list[dict[str, Any]]] = {full: [] for full in trees}
        for round_ in range(args.rounds):
            order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
            for full in order:
                result = measure(trees[full], spec_path, runs / f"{shape}-{full[:12]}-{round_}.json", args.threads)
                measured[full].append(result)
                log(f"{shape} round {round_} {full[:12]}: {result['episodes_per_s']:.2f} episodes/s")
        report["shapes"][shape] = {
            "spec": SHAPES[shape],
            "median_episodes_per_s": {
                full[:12]: statistics.median(run["episodes_per_s"] for run in runs_) for full, runs_ in measured.items()
            },
            "median_s_per_update": {
                full[:12]: {
                    phase: round(statistics.median(run["s_per_update"][phase] for run in runs_), 4)
                    for phase in runs_[0]["s_per_update"]
                }
                for full, runs_ in measured.items()
            },
            "rounds": {full[:12]: runs_ for full, runs_ in measured.items()},
        }
        log(f"{shape}: median episodes/s {report['shapes'][shape]['median_episodes_per_s']}")
    report["duration_s"] = round(time.time() - began, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
