"""Fixtures of the reliability suite, and its report.

Each fault test records the faults it injected (`faults.injected(kind, ...)`) and each bad-input
case its verdict; a fault counts as survived when its test passed. At the end of the session the
counts, every fault and case, and the tests' durations are written as JSON to
`PPOFLOW_RELIABILITY_REPORT`, else `.pytest_cache/d/ppoflow-reliability/report.json` (or the
session's temporary directory when the cache is off), and summed up in the terminal.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.*` helper modules, here and in the processes the tests start
    sys.path.insert(0, str(REPO))

from tests.reliability.helpers import read_metrics, reliability_config, subprocess_env, write_config  # noqa: E402
from tests.reliability.launcher import ColdLauncher, make_launcher  # noqa: E402

REPORT_KEY = pytest.StashKey[dict]()


# ------------------------------------------------------------------------------------------------
# The report


def _report(config: pytest.Config) -> dict[str, Any]:
    if REPORT_KEY not in config.stash:
        config.stash[REPORT_KEY] = {"began": time.time(), "faults": [], "bad_inputs": [], "tests": {}}
    return config.stash[REPORT_KEY]


class FaultLog:
    """The faults one test injects; each becomes `survived` when the test passes."""

    def __init__(self, test: str):
        self.test = test
        self.entries: list[dict[str, Any]] = []

    def injected(self, kind: str, **details: Any) -> None:
        self.entries.append({"test": self.test, "kind": kind, **details})


def pytest_sessionstart(session: pytest.Session) -> None:
    _report(session.config)  # the clock starts here


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if "reliability" in item.nodeid:
        tests = _report(item.config)["tests"]
        entry = tests.setdefault(item.nodeid, {"seconds": 0.0, "outcome": "passed"})
        entry["seconds"] = round(entry["seconds"] + report.duration, 2)
        if report.failed:
            entry["outcome"] = "failed"
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
    return report


def _passed(node: pytest.Item) -> bool:
    report = getattr(node, "rep_call", None)
    return report is not None and report.passed


@pytest.fixture
def faults(request) -> Iterator[FaultLog]:
    log = FaultLog(request.node.name)
    yield log
    survived = _passed(request.node)
    _report(request.config)["faults"].extend({**entry, "survived": survived} for entry in log.entries)


@pytest.fixture
def bad_input_verdict(request) -> Iterator[dict[str, Any]]:
    """A bad-input case fills in what it tried and the message it got; refused clearly when it passed."""
    verdict: dict[str, Any] = {
        "case": request.node.callspec.id if hasattr(request.node, "callspec") else request.node.name
    }
    yield verdict
    _report(request.config)["bad_inputs"].append({**verdict, "refused_clearly": _passed(request.node)})


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
    report = session.config.stash[REPORT_KEY]
    faults, cases = report["faults"], report["bad_inputs"]
    if not report["tests"]:
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
        "wall_seconds": round(time.time() - report["began"], 1),
        "faults": {"injected": len(faults), "survived": sum(f["survived"] for f in faults), "by_kind": by_kind},
        "bad_inputs": {"tried": len(cases), "refused_clearly": sum(c["refused_clearly"] for c in cases)},
        "tests": report["tests"],
        "fault_log": faults,
        "bad_input_log": cases,
    }
    path = _report_path(session.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    report["written"] = (path, summary)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    written = config.stash.get(REPORT_KEY, {}).get("written")
    if written:
        path, summary = written
        terminalreporter.write_line(
            f"reliability: {summary['faults']['survived']}/{summary['faults']['injected']} faults survived, "
            f"{summary['bad_inputs']['refused_clearly']}/{summary['bad_inputs']['tried']} bad inputs refused clearly "
            f"({summary['wall_seconds']} s) — report: {path}"
        )


# ------------------------------------------------------------------------------------------------
# Processes and the uninterrupted reference run


@pytest.fixture(scope="session")
def launcher():
    """Starts `ppoflow train` processes (forked from a warm helper; see launcher.py)."""
    started = make_launcher(subprocess_env())
    yield started
    started.close()


@pytest.fixture(scope="session")
def reliability_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def reference(toy_world, reliability_dir) -> dict[str, Any]:
    """One uninterrupted `ppoflow train` of the suite's training config, started cold: the run every
    interrupted one must reproduce bit for bit (output dirs differ; training is identical)."""
    output_dir = reliability_dir / "reference"
    config_path = write_config(reliability_config(toy_world, output_dir), reliability_dir / "reference.yaml")
    log = reliability_dir / "reference.log"
    child = ColdLauncher(subprocess_env()).start(["train", "--config", str(config_path)], log)
    code = child.wait(timeout=900)
    assert code == 0, log.read_text()[-3000:]
    return {
        "output_dir": output_dir,
        "metrics": read_metrics(output_dir),
        "eval": json.loads((output_dir / "eval.json").read_text()),
    }


@pytest.fixture
def train_run(toy_world, tmp_path, launcher):
    """`start(name, *overrides, env=None) -> (child, output_dir, log)`: a `ppoflow train` of the suite's
    training config into `tmp_path/name` (the same config file, hence the same run, on every call)."""

    def start(name: str, *overrides: str, env: dict[str, str] | None = None, output_dir: Path | None = None):
        output_dir = output_dir or tmp_path / name
        config_path = tmp_path / f"{name}.yaml"
        if not config_path.exists():
            write_config(reliability_config(toy_world, output_dir, *overrides), config_path)
        log = tmp_path / f"{name}.log"
        return launcher.start(["train", "--config", str(config_path)], log, env), output_dir, log

    return start
