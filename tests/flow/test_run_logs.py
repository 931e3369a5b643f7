"""`ppoflow run` quiets the console, not the Prefect UI: every task's log keeps its lines."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import yaml

from ppoflow.console import CHATTY_LOGGERS, STAGES
from ppoflow.flows.cli import main
from tests.flow.test_distributed_flow import task_log
from tests.flow.test_flow import task_runs

pytestmark = [pytest.mark.flow, pytest.mark.slow]


def test_ppoflow_run_sends_the_task_run_lines_to_the_prefect_api(
    flow_env, make_flow_config, tmp_path, capsys, monkeypatch
):
    """The command's console set-up ran in this process (as in `ppoflow run`); the stages' task runs
    still log "Finished in state Completed()" to the API, where the UI reads them (the console's handler,
    not the logger, leaves them out)."""
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for name in (*CHATTY_LOGGERS, "ppoflow", "prefect.task_runs"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(make_flow_config("run-logs", "ppo.total_episodes=16")))
    assert main(["run", "--config", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stages = task_runs(summary["prefect_flow_run_id"])
    assert set(stages) == set(STAGES)
    # the API handler ships logs in batches from a background thread: the last task's may land a moment later
    missing = set(stages)
    deadline = time.monotonic() + 60
    while missing and time.monotonic() < deadline:
        missing = {name for name in missing if "Finished in state Completed()" not in task_log(stages[name].id)}
        time.sleep(0.5)
    assert not missing, f"no 'Finished in state Completed()' in the Prefect log of {sorted(missing)}"
