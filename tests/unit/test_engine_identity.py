"""The stage cache key holds the engine's identity: ppoflow's version and a digest of its source."""

from __future__ import annotations

import shutil
from pathlib import Path

from ppoflow.provenance import engine_identity

ENGINE = Path(__file__).resolve().parents[2] / "ppoflow"


def test_an_edited_engine_has_another_identity(tmp_path):
    copy = tmp_path / "ppoflow"
    shutil.copytree(ENGINE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert engine_identity(copy) == engine_identity(ENGINE)  # same files, same identity
    edited = tmp_path / "edited"
    shutil.copytree(copy, edited)
    (edited / "advantages.py").write_text((edited / "advantages.py").read_text() + "\n# a change\n")
    assert engine_identity(edited) != engine_identity(copy)
    renamed = tmp_path / "renamed"
    shutil.copytree(copy, renamed)
    (renamed / "losses.py").rename(renamed / "losses2.py")
    assert engine_identity(renamed) != engine_identity(copy)
    (copy / "notes.txt").write_text("not source")
    assert engine_identity.__wrapped__(copy) == engine_identity(ENGINE)
