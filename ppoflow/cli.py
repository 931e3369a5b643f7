"""The engine's command line: `ppoflow toy` and `ppoflow train` (no Prefect needed).

`ppoflow run` (the Prefect flow) is added by `flows.cli`, the installed `ppoflow` command, so the
engine never imports the orchestration layer. The last stdout line of every command is one JSON
summary object; logs and progress go to stderr; a user error prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ppoflow.errors import PpoflowError
from ppoflow.manifests import Release, RunPlan

EXIT_USER_ERROR = 2


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/toy.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override one config value (repeatable), e.g. --set ppo.learning_rate=1e-5",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppoflow", description="RLHF with PPO: policy, reference, reward and value models.")
    parser.add_argument("--log-level", default="INFO", help="logging level for stderr (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    toy = commands.add_parser("toy", help="build the offline toy world (SFT policy, reward model, prompts)")
    toy.add_argument("--out", required=True, type=Path, help="directory to build into")
    toy.add_argument("--seed", type=int, default=0, help="build seed (same seed, same bytes)")
    train = commands.add_parser("train", help="run the PPO engine alone, resuming from the newest checkpoint")
    add_config_arguments(train)
    return parser


def final_metrics(output_dir: Path) -> dict[str, Any]:
    """The last update's metrics from metrics.jsonl."""
    path = output_dir / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def run_summary(plan: RunPlan, release: Release) -> dict[str, Any]:
    """The JSON summary of a finished run: where it is, how far it went, how it evaluates."""
    last = final_metrics(plan.output_dir)
    return {
        "output_dir": str(plan.output_dir),
        "config_hash": plan.config_hash,
        "updates": last.get("update"),
        "episodes": last.get("episode"),
        "final_metrics": {key: value for key, value in last.items() if key.startswith(("objective/", "loss/", "policy/"))},
        "eval": release.eval_metrics,
        "policy_dir": str(release.policy_dir),
    }


def command_toy(args: argparse.Namespace) -> dict[str, Any]:
    from ppoflow.toy import build_toy

    return build_toy(args.out, seed=args.seed)


def command_train(args: argparse.Namespace) -> dict[str, Any]:
    from ppoflow.config import load_config
    from ppoflow.pipeline import run_all

    began = time.perf_counter()
    plan, release = run_all(load_config(args.config, args.overrides))
    return {**run_summary(plan, release), "wall_seconds": round(time.perf_counter() - began, 2)}


COMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"toy": command_toy, "train": command_train}


def run_command(parser: argparse.ArgumentParser, commands: dict[str, Callable], argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = commands[args.command](args)
    except PpoflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    from ppoflow.runtime import process_state

    if process_state().is_main_process:
        print(json.dumps(summary, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
