"""The command line's own refusals and answers, before any work: one line each."""

from __future__ import annotations

import importlib.metadata

import pytest

from ppoflow.flows.cli import main


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"ppoflow {importlib.metadata.version('ppoflow')}"


def test_a_bad_log_level_is_one_line_and_exit_status_2(capsys):
    assert main(["--log-level", "verbose", "train", "--config", "configs/toy.yaml"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "error: --log-level 'verbose' is not a logging level — use one of DEBUG, INFO, WARNING, ERROR"
    ]


def test_the_console_leaves_out_prefects_task_run_lines_but_the_logger_keeps_them(monkeypatch):
    """Above DEBUG the console's handler drops Prefect's task-run lines below WARNING ("Finished in state
    Completed()", the ranks' relayed lines); the logger itself is left alone, so its API handler (the
    task's log in the Prefect UI) still gets them. At DEBUG the console shows everything."""
    import logging
    import os

    from ppoflow.console import console_handler, quiet_libraries

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "Finished in state Completed()", None, None)

    quiet = console_handler(logging.INFO)
    assert not quiet.filter(record("prefect.task_runs", logging.INFO))
    assert quiet.filter(record("prefect.task_runs", logging.WARNING))
    assert quiet.filter(record("ppoflow", logging.INFO))
    assert quiet.filter(record("prefect.flow_runs", logging.INFO))
    assert console_handler(logging.DEBUG).filter(record("prefect.task_runs", logging.INFO))

    task_runs = logging.getLogger("prefect.task_runs")
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setattr(task_runs, "level", task_runs.level)
    for name in ("mlflow", "alembic", "matplotlib", "httpx", "urllib3", "filelock"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    before = task_runs.level
    quiet_libraries(logging.INFO)
    assert task_runs.level == before
    assert "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL" not in os.environ
