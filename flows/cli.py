"""The installed `ppoflow` command: the engine's `toy` and `train`, plus `run`, the Prefect flow.

`ppoflow run --config FILE [--set key.path=value ...]` runs `ppoflow.flows.rlhf_ppo` against the Prefect API
of `PREFECT_API_URL`, or an ephemeral one when it is unset, with MLflow tracking from
`MLFLOW_TRACKING_URI` (else the SQLite store in `.ppoflow/mlflow`). A config error, or a tracking
store that does not answer, is reported in one line (exit status 2) before Prefect starts; the flow
checks the store again itself, for the deployments that run it without this command. Logs go to stderr,
the last of them the run's page in `mlflow ui`; the last stdout line is the JSON summary, with the Prefect
flow run id, the MLflow experiment and run ids and the registered model version. After a failure, the same command
again (or `prefect flow-run retry <id>`) reuses the finished stages and resumes training.

Prefect settings it sets only when unset are in `PREFECT_DEFAULTS`. `PREFECT_HOME` is left alone, so
the user's Prefect profiles keep applying; ephemeral runs keep their history in its database.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from ppoflow.cli import COMMANDS, add_config_arguments, run_command
from ppoflow.cli import build_parser as build_engine_parser
from ppoflow.errors import PpoflowError

log = logging.getLogger("ppoflow.flows.cli")

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a cold ephemeral server needs ~12 s on 2 cores
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the machines are offline
    "PREFECT_LOGGING_EXTRA_LOGGERS": "ppoflow",  # the engine's logs in the Prefect UI, beside the flow's
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # ppoflow's lines before and after the flow run stay local
}


def build_parser() -> argparse.ArgumentParser:
    parser = build_engine_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    run = commands.add_parser("run", help="run the whole pipeline as a Prefect flow with MLflow tracking")
    add_config_arguments(run)
    for decision, verb in (("approve", "approve"), ("reject", "reject")):
        answer = commands.add_parser(
            decision,
            help=f"{verb} the registered version a flow run awaits approval for "
            "(tracking.promotion.approval: required), as the form in its Prefect UI page does",
        )
        answer.add_argument("flow_run_id", help="the waiting flow run's id (printed by `ppoflow run`)")
        answer.add_argument("--by", required=True, dest="approver", help="who decides (recorded on the version)")
        answer.add_argument("--comment", default="", help="why (recorded beside the decision)")
    return parser


def command_answer(args: argparse.Namespace) -> dict[str, Any]:
    from ppoflow.flows.approval import answer

    sent = answer(args.flow_run_id, args.command, args.approver, args.comment)
    log.info("%s", sent)
    return {"flow_run_id": args.flow_run_id, "decision": args.command, "approver": args.approver}


def command_run(args: argparse.Namespace) -> dict[str, Any]:
    from ppoflow.config import load_config

    began = time.perf_counter()
    config = load_config(args.config, args.overrides)  # a bad config stops here, before Prefect starts
    from ppoflow import tracking

    tracking.check_reachable(tracking.resolve_tracking_uri())  # so does a tracking store that does not answer
    from ppoflow.flows import rlhf_ppo as flow_module

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    state = flow_module.rlhf_ppo(config=config, return_state=True)
    try:
        summary = state.result()  # raises the stage's error for a failed run
    except PpoflowError:
        raise  # the user's to fix; run_command prints it
    except BaseException:
        flow_run_id = state.state_details.flow_run_id
        log.error(
            "flow run %s ended %s: run the same command again, or "
            "`prefect flow-run retry %s --entrypoint %s:rlhf_ppo`, to reuse the finished stages and resume training",
            flow_run_id,
            state.name,
            flow_run_id,
            flow_module.__file__,
        )
        raise
    url = tracking.mlflow_ui_run_url(summary["mlflow_experiment_id"], summary["mlflow_run_id"])
    log.info("the MLflow run, with `mlflow ui` on its store: %s", url)
    return {**summary, "wall_seconds": round(time.perf_counter() - began, 2)}


def main(argv: list[str] | None = None) -> int:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    commands = {**COMMANDS, "run": command_run, "approve": command_answer, "reject": command_answer}
    return run_command(build_parser(), commands, argv)


if __name__ == "__main__":
    sys.exit(main())
