"""Content digests of files, directory trees and local prompt sources.

A module of its own so that manifests (which check their files with these digests) and the
checkpoint writer (which records them) both import it, and not each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from ppoflow.partitions import select_partitions

if TYPE_CHECKING:
    from ppoflow.config import DataWindow


_REMEMBERED: ContextVar[dict[tuple, str] | None] = ContextVar("ppoflow_remembered_digests", default=None)


@contextmanager
def remembered_digests() -> Iterator[None]:
    """Within the block, a file is hashed once while its path, inode, size and modification time stay
    the same. For checking many records against the same files in one go: the cache's walk over a
    stage's stale manifests (`ppoflow.tasks.common.IntactManifests`) would otherwise hash the data window's
    partitions once per night the workspace has seen. Nothing is remembered past the block."""
    token = _REMEMBERED.set({}) if _REMEMBERED.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _REMEMBERED.reset(token)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    remembered = _REMEMBERED.get()
    if remembered is not None:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key in remembered:
            return remembered[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    if remembered is not None:
        remembered[key] = digest.hexdigest()
    return digest.hexdigest()


def sha256_tree(root: Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """One digest over the relative names and contents of the files below `root`."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in patterns for p in root.rglob(pattern) if p.is_file()})
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def partitions_digest(partitions: Sequence[tuple[str, str]]) -> str:
    """Digest of the partitions read, in order, as (file name, sha256) pairs: a partition added,
    dropped from the window, renamed (its date) or edited changes it."""
    canonical = json.dumps([list(pair) for pair in partitions], separators=(",", ":"))
    return f"partitions:{hashlib.sha256(canonical.encode()).hexdigest()}"


def local_source_digest(path: Path | str, split: str, window: DataWindow | None = None) -> str | None:
    """Digest of a local prompt source as stage 3 read it (file, saved dataset, or the partitions
    `window` selects); None for a Hub id, whose content the Hub versions by revision."""
    partitions = select_partitions(str(path), window)
    if partitions is not None:
        return partitions_digest([(partition.path.name, sha256_file(partition.path)) for partition in partitions])
    path = Path(path)
    if path.is_file():
        return f"file:{sha256_file(path)}"
    if (path / "dataset_dict.json").is_file():
        return f"saved:{sha256_tree(path / split)}"
    if (path / "state.json").is_file():
        return f"saved:{sha256_tree(path)}"
    return None
