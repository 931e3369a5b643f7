"""Fixtures of the reliability suite: the fault log and bad-input verdicts its report sums up
(tests/reliability/report.py), the processes it starts, and the uninterrupted reference run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.*` helper modules, here and in the processes the tests start
    sys.path.insert(0, str(REPO))

from tests.reliability.helpers import read_metrics, reliability_config, subprocess_env, write_config  # noqa: E402
from tests.reliability.launcher import ColdLauncher, make_launcher  # noqa: E402
from tests.reliability.report import report  # noqa: E402

# ------------------------------------------------------------------------------------------------
# What the report records (tests/reliability/report.py sums it up)


class FaultLog:
    """The faults one test injects; each becomes `survived` when the test passes."""

    def __init__(self, test: str):
        self.test = test
        self.entries: list[dict[str, Any]] = []

    def injected(self, kind: str, **details: Any) -> None:
        self.entries.append({"test": self.test, "kind": kind, **details})


def _passed(node: pytest.Item) -> bool:
    report = getattr(node, "rep_call", None)
    return report is not None and report.passed


@pytest.fixture
def faults(request) -> Iterator[FaultLog]:
    log = FaultLog(request.node.name)
    yield log
    survived = _passed(request.node)
    report(request.config)["faults"].extend({**entry, "survived": survived} for entry in log.entries)


@pytest.fixture
def bad_input_verdict(request) -> Iterator[dict[str, Any]]:
    """A bad-input case fills in what it tried and the message it got; refused clearly when it passed."""
    verdict: dict[str, Any] = {
        "case": request.node.callspec.id if hasattr(request.node, "callspec") else request.node.name
    }
    yield verdict
    report(request.config)["bad_inputs"].append({**verdict, "refused_clearly": _passed(request.node)})


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
