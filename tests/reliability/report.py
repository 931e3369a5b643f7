"""The reliability suite's report: a plugin of the whole session (tests/conftest.py registers it).

Each fault test records the faults it injected (`faults.injected(kind, ...)`) and each bad-input
case its verdict; a fault counts as survived when its test passed. At the end of the session the
counts, every fault and case, and the tests' durations are written as JSON to
`PPOFLOW_RELIABILITY_REPORT`, else `.pytest_cache/d/ppoflow-reliability/report.json` (or the
session's temporary directory when the cache is off), and summed up in the terminal. Under
pytest-xdist (`make test` runs two workers) each worker hands its part to the controller, which runs no
test itself, and the controller writes and sums up the whole.
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

WORKER_OUTPUT = "ppoflow_reliability"

REPORT_KEY = pytest.StashKey[dict]()


def report(config: pytest.Config) -> dict[str, Any]:
    if REPORT_KEY not in config.stash:
        config.stash[REPORT_KEY] = {"began": time.time(), "faults": [], "bad_inputs": [], "tests": {}}
    return config.stash[REPORT_KEY]


def pytest_sessionstart(session: pytest.Session) -> None:
    report(session.config)  # the clock starts here


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    made = yield
    setattr(item, f"rep_{made.when}", made)
    if "reliability" in item.nodeid:
        tests = report(item.config)["tests"]
        entry = tests.setdefault(item.nodeid, {"seconds": 0.0, "outcome": "passed"})
        entry["seconds"] = round(entry["seconds"] + made.duration, 2)
        if made.failed:
            entry["outcome"] = "failed"
        elif made.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
    return made


def _report_path(config: pytest.Config) -> Path:
    if os.environ.get("PPOFLOW_RELIABILITY_REPORT"):
        return Path(os.environ["PPOFLOW_RELIABILITY_REPORT"])
    cache = getattr(config, "cache", None)
    if cache is not None:
        return cache.mkdir("ppoflow-reliability") / "report.json"
    return Path(config._tmp_path_factory.getbasetemp()) / "ppoflow-reliability-report.json"


def pytest_sessionfinish(session: pytest.Session) -> None:
    if REPORT_KEY not in session.config.stash:
        return
    recorded = session.config.stash[REPORT_KEY]
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: the controller writes the whole
        session.config.workeroutput[WORKER_OUTPUT] = recorded
        return
    faults, cases = recorded["faults"], recorded["bad_inputs"]
    if not recorded["tests"]:
        return
    by_kind: dict[str, dict[str, int]] = {}
    for fault in faults:
        counts = by_kind.setdefault(fault["kind"], {"injected": 0, "survived": 0})
        counts["injected"] += 1
        counts["survived"] += fault["survived"]
    summary = {
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        },
        "launcher": "cold" if os.environ.get("PPOFLOW_RELIABILITY_COLD") == "1" else "warm",
        "wall_seconds": round(time.time() - recorded["began"], 1),
        "faults": {"injected": len(faults), "survived": sum(f["survived"] for f in faults), "by_kind": by_kind},
        "bad_inputs": {"tried": len(cases), "refused_clearly": sum(c["refused_clearly"] for c in cases)},
        "tests": recorded["tests"],
        "fault_log": faults,
        "bad_input_log": cases,
    }
    path = _report_path(session.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    recorded["written"] = (path, summary)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    written = config.stash.get(REPORT_KEY, {}).get("written")
    if written:
        path, summary = written
        terminalreporter.write_line(
            f"reliability: {summary['faults']['survived']}/{summary['faults']['injected']} faults survived, "
            f"{summary['bad_inputs']['refused_clearly']}/{summary['bad_inputs']['tried']} bad inputs refused clearly "
            f"({summary['wall_seconds']} s) — report: {path}"
        )


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist, in the controller: a worker finished; add its part of the report."""
    part = getattr(node, "workeroutput", {}).get(WORKER_OUTPUT)
    if not part:
        return
    whole = report(node.config)
    whole["began"] = min(whole["began"], part["began"])
    whole["faults"] += part["faults"]
    whole["bad_inputs"] += part["bad_inputs"]
    whole["tests"].update(part["tests"])
