"""The engine's command line: `ppoflow init`, `toy`, `smol`, `train`, `stage` and `join` (no Prefect needed).

`ppoflow run` (the Prefect flow) is added by `ppoflow.flows.cli`, the installed `ppoflow` command, so the
engine never imports the orchestration layer. The last stdout line of every command is one JSON
summary object; logs and progress go to stderr; a user error prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ppoflow.console import console_handler, quiet_libraries
from ppoflow.errors import PpoflowError
from ppoflow.manifests import Release, RunPlan
from ppoflow.workspace import METRICS_FILE, read_jsonl

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_ORPHANED = 3
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C (128 + SIGINT)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def installed_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("ppoflow")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/toy.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one config value (repeatable), e.g. --set ppo.learning_rate=1e-5",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppoflow", description="RLHF with PPO: policy, reference, reward and value models."
    )
    parser.add_argument("--version", action="version", version=f"ppoflow {installed_version()}")
    parser.add_argument(
        "--log-level", default="INFO", help=f"logging level for stderr: {', '.join(LOG_LEVELS)} (default INFO)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser(
        "init", help="write the starter configs: my-model.yaml (your models) and toy.yaml (the toy world)"
    )
    init.add_argument("--dir", type=Path, default=Path("."), help="directory to write them into (default: here)")
    init.add_argument("--force", action="store_true", help="overwrite files of the same names")
    toy = commands.add_parser("toy", help="build the offline toy world (SFT policy, reward model, prompts)")
    toy.add_argument("--out", required=True, type=Path, help="directory to build into")
    toy.add_argument("--seed", type=int, default=0, help="build seed (same seed, same bytes)")
    smol = commands.add_parser(
        "smol", help="build the real-model world (SmolLM2-135M-Instruct, prompts, a trained reward model)"
    )
    smol.add_argument(
        "--out", required=True, type=Path, help="directory to build into (a step already built there is kept)"
    )
    smol.add_argument("--seed", type=int, default=0, help="build seed")
    smol.add_argument("--threads", type=int, default=2, help="torch threads while building (default 2)")
    train = commands.add_parser("train", help="run the PPO engine alone, resuming from the newest checkpoint")
    add_config_arguments(train)
    stage = commands.add_parser(
        "stage", help="run stage 4 or 5 from manifests on disk: what `ppoflow run` starts under accelerate launch"
    )
    stage.add_argument("name", choices=sorted(STAGES))
    stage.add_argument(
        "--inputs", required=True, type=Path, help="JSON object of the stage's input manifests (plan, models, data)"
    )
    stage.add_argument(
        "--result", required=True, type=Path, help="where the main process writes the stage's result manifest"
    )
    stage.add_argument("--mlflow-run-id", default=None, help="stage 5: send each update's metrics to this MLflow run")
    stage.add_argument(
        "--parent-pid", type=int, default=None, help="end this process when that one is gone (no orphans)"
    )
    join = commands.add_parser(
        "join",
        help="on another machine of a multi-machine run: start this machine's share of each stage the flow launches",
    )
    join.add_argument(
        "--output-dir",
        required=True,
        type=Path,
        help="the run's output_dir, as the main machine sees it (shared storage)",
    )
    join.add_argument("--machine-rank", required=True, type=int, help="this machine's rank, 1 to num_machines - 1")
    join.add_argument(
        "--accelerate-config", type=Path, default=None, help="this machine's accelerate config (default: the flow's)"
    )
    join.add_argument(
        "--idle-timeout", type=float, default=None, help="give up after this many seconds without a launch to join"
    )
    return parser


def final_metrics(output_dir: Path) -> dict[str, Any]:
    """The last update's metrics from metrics.jsonl."""
    rows = read_jsonl(output_dir / METRICS_FILE)
    return rows[-1] if rows else {}


def run_summary(plan: RunPlan, release: Release) -> dict[str, Any]:
    """The JSON summary of a finished run: where it is, how far it went, how it evaluates."""
    last = final_metrics(plan.output_dir)
    return {
        "output_dir": str(plan.output_dir),
        "config_hash": plan.config_hash,
        "updates": last.get("update"),
        "episodes": last.get("episode"),
        "final_metrics": {
            key: value for key, value in last.items() if key.startswith(("objective/", "loss/", "policy/"))
        },
        "eval": release.eval_metrics,
        "policy_dir": str(release.policy_dir),
    }


STARTER_CONFIGS = ("my-model.yaml", "toy.yaml")  # shipped in the wheel as ppoflow.configs


def command_init(args: argparse.Namespace) -> dict[str, Any]:
    """Copy the starter configs out of the package; nothing is written when one would be overwritten."""
    from importlib import resources

    from ppoflow.atomic import write_text_atomic

    targets = [args.dir / name for name in STARTER_CONFIGS]
    existing = [str(target) for target in targets if target.exists()]
    if existing and not args.force:
        raise PpoflowError(
            f"{' and '.join(existing)} {'exists' if len(existing) == 1 else 'exist'} "
            "— edit, pass --force to overwrite, or --dir another directory"
        )
    args.dir.mkdir(parents=True, exist_ok=True)
    for name, target in zip(STARTER_CONFIGS, targets, strict=True):
        write_text_atomic(target, resources.files("ppoflow.configs").joinpath(name).read_text())
    toy = targets[1]
    log.info(
        "wrote %s; try the toy world first: `ppoflow toy --out .ppoflow/toy`, then `ppoflow run --config %s`",
        ", ".join(map(str, targets)),
        toy,
    )
    return {"written": [str(target) for target in targets]}


def command_toy(args: argparse.Namespace) -> dict[str, Any]:
    from ppoflow.toy import build_toy

    return build_toy(args.out, seed=args.seed)


def command_smol(args: argparse.Namespace) -> dict[str, Any]:
    from ppoflow.smol import build_smol

    return build_smol(args.out, seed=args.seed, num_threads=args.threads)


def command_train(args: argparse.Namespace) -> dict[str, Any]:
    from ppoflow.config import load_config
    from ppoflow.pipeline import run_all

    began = time.perf_counter()
    plan, release = run_all(load_config(args.config, args.overrides))
    return {**run_summary(plan, release), "wall_seconds": round(time.perf_counter() - began, 2)}


STAGES = ("init_trainer", "train")


def _end_with_parent(pid: int) -> None:
    """A daemon thread that ends this process when `pid` is gone: a flow process killed outright
    (SIGKILL, OOM) cannot end its launched group itself, and a rank left behind would hold its GPU."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                log.error("the process that launched this one (%d) is gone: exiting", pid)
                os._exit(EXIT_ORPHANED)
            except PermissionError:  # alive, another user's (cannot be ours): keep watching
                pass

    threading.Thread(target=watch, name="ppoflow-parent-watch", daemon=True).start()


def command_stage(args: argparse.Namespace) -> dict[str, Any]:
    from ppoflow import pipeline
    from ppoflow.atomic import write_text_atomic
    from ppoflow.manifests import DatasetManifest, ModelManifest
    from ppoflow.runtime import process_state

    if args.parent_pid is not None:
        _end_with_parent(args.parent_pid)
    inputs = json.loads(args.inputs.read_text())
    plan = RunPlan.model_validate(inputs["plan"])
    models = ModelManifest.model_validate(inputs["models"])
    data = DatasetManifest.model_validate(inputs["data"])
    main_process = process_state(plan.config.runtime).is_main_process
    if args.name == "init_trainer":
        result = pipeline.init_trainer(plan, models, data)
    else:
        sink = None
        if args.mlflow_run_id and main_process:
            from ppoflow.tracking import TrackingRun

            sink = TrackingRun.attach(args.mlflow_run_id, output_dir=plan.output_dir).metrics_sink()
        try:
            result = pipeline.train(plan, models, data, callbacks=[sink] if sink else [])
        finally:
            if sink is not None:
                sink.close()  # delivers what is buffered (the rest waits in the spool for the resume)
    if main_process:
        write_text_atomic(args.result, result.model_dump_json())
    return {"stage": args.name, "result": str(args.result)}


def command_join(args: argparse.Namespace) -> dict[str, Any]:
    from ppoflow.machines import join

    served = join(
        args.output_dir.expanduser().resolve(),
        args.machine_rank,
        accelerate_config=args.accelerate_config,
        idle_timeout=args.idle_timeout,
    )
    return {"machine_rank": args.machine_rank, "launches": served}


COMMANDS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "init": command_init,
    "toy": command_toy,
    "smol": command_smol,
    "train": command_train,
    "stage": command_stage,
    "join": command_join,
}


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever the command's libraries print to stdout (DeepSpeed's accelerator notice, a
    third-party print) to stderr, down to file descriptor 1, so that stdout carries the summary alone."""
    sys.stdout.flush()
    saved_fd, saved_stream = os.dup(1), sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stdout = saved_stream
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def run_command(parser: argparse.ArgumentParser, commands: dict[str, Callable], argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    if args.log_level.upper() not in LOG_LEVELS:
        print(
            f"error: --log-level {args.log_level!r} is not a logging level — use one of {', '.join(LOG_LEVELS)}",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    # set by accelerate launch
    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    level = logging.getLevelName(args.log_level.upper())
    logging.basicConfig(
        level=level, handlers=[console_handler(level)], format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s"
    )
    quiet_libraries(level)
    try:
        with stdout_to_stderr():
            summary = commands[args.command](args)
    except PpoflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            f"interrupted: finished stages and checkpoints are kept; run `ppoflow {args.command}` with the same "
            "arguments again to resume from the newest checkpoint",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    from ppoflow.runtime import process_state

    if process_state().is_main_process:
        print(json.dumps(summary, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
