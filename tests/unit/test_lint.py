"""Ruff over the whole repository, as `make lint` runs it: the lint rules and the formatter settings
are pyproject.toml's [tool.ruff]; CI's `make test` runs this, so code that breaks them fails CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The venv's own ruff (the dev extra), not whichever is first on PATH: its version decides the rules.
RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_passes_over_the_repository(command):
    assert RUFF.is_file(), f"{RUFF} is missing: install the dev extra (make install)"
    done = subprocess.run([str(RUFF), *command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"ruff {' '.join(command)} failed (fix it, or run `ruff check --fix .` and `ruff format .`):\n"
        f"{done.stdout}{done.stderr}"
    )
