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
