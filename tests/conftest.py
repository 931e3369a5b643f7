"""Fixtures shared by the whole test suite."""

import json
import os
import sys
import warnings
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub: every model comes from the offline toy world.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tests.*` modules
    sys.path.insert(0, str(REPO))


def pytest_configure(config: pytest.Config) -> None:
    # The reliability report is a plugin of the whole session, not of tests/reliability's conftest: under
    # pytest-xdist the controller runs no test and loads no conftest below this one, yet gathers the report.
    from tests.reliability import report

    if not config.pluginmanager.is_registered(report):
        config.pluginmanager.register(report, "ppoflow-reliability-report")


TOY_SEED = 0


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline toy RLHF world built with seed 0, once per test session (about 30-60 s).

    The directory holds `policy/`, `reward/`, `prompts.jsonl`, `prompts/` and `toy.json` (see
    `ppoflow.toy.build_toy`). To iterate fast, build it once (`ppoflow toy --out DIR --seed 0`) and
    set `PPOFLOW_TEST_TOY_DIR=DIR`: a directory whose `toy.json` records seed 0 is used as is.
    Rebuild it after changing `ppoflow/toy`, or the determinism test will (rightly) fail.
    """
    prebuilt = os.environ.get("PPOFLOW_TEST_TOY_DIR")
    if prebuilt:
        summary_file = Path(prebuilt) / "toy.json"
        if summary_file.is_file() and json.loads(summary_file.read_text()).get("seed") == TOY_SEED:
            return Path(prebuilt)
        warnings.warn(
            f"PPOFLOW_TEST_TOY_DIR={prebuilt} has no toy.json with seed {TOY_SEED}; building a fresh toy", stacklevel=1
        )
    # Imported here so that test runs which never ask for the toy do not pay for importing torch.
    from ppoflow.toy import build_toy

    out_dir = tmp_path_factory.mktemp("toy_world")
    build_toy(out_dir, seed=TOY_SEED)
    return out_dir


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: the OS hands it out and it is released at once."""
    from ppoflow.processes import free_port

    return free_port()
