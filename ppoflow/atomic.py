"""Directories written whole or not at all.

A directory is built under a hidden `.partial-*` name beside its target and renamed into place
only once complete. A target that already exists is first renamed aside (`.retired-*`) and
deleted only after the new one is in place, so a crash at any moment leaves either the old or the
new directory complete on disk, never a half-written one under the target's name. (Linux's
`renameat2(RENAME_EXCHANGE)` would make the swap itself atomic; Python does not expose it, and
readers here look the target up once, so the short window without it is harmless.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PARTIAL_PREFIX = ".partial-"
RETIRED_PREFIX = ".retired-"


def write_directory(target: Path, write: Callable[[Path], T], *, suffix: str = "") -> T:
    """Call `write(staging)` to fill an empty hidden directory `.partial-<name><suffix>` beside
    `target`, then move it into place. Returns what `write` returned; on any failure the staging
    directory is removed and the old `target` (if any) is untouched. One writer per target: a
    staging directory left by a crashed writer of the same name is cleared first (`suffix`, e.g.
    the pid, keeps concurrent writers of one name apart)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{PARTIAL_PREFIX}{target.name}{suffix}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        result = write(staging)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def replace_directory(new: Path, target: Path) -> None:
    """Move the complete directory `new` to `target`, retiring (then deleting) an existing one."""
    if not target.exists():
        os.replace(new, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f"{RETIRED_PREFIX}{target.name}-", dir=target.parent))
    os.replace(target, retired)
    os.replace(new, target)
    shutil.rmtree(retired, ignore_errors=True)


def remove_directory(target: Path) -> None:
    """Delete `target` so that it is never seen half deleted under its name (a crash, a file system
    turned read-only mid-way): renamed aside first, then deleted. OSError when it cannot be moved."""
    retired = Path(tempfile.mkdtemp(prefix=f"{RETIRED_PREFIX}{target.name}-", dir=target.parent))
    os.replace(target, retired)
    shutil.rmtree(retired, ignore_errors=True)


def remove_leftovers(directory: Path) -> None:
    """Delete staging and retired directories that a crashed writer left in `directory`."""
    for prefix in (PARTIAL_PREFIX, RETIRED_PREFIX):
        for leftover in directory.glob(f"{prefix}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def write_text_atomic(target: Path, text: str) -> None:
    """`target` holds the old text or all of `text`, never a part: written beside it, then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{PARTIAL_PREFIX}{target.name}")
    staging.write_text(text)
    os.replace(staging, target)
