"""Content digests of files, directory trees and local prompt sources.

A module of its own so that manifests (which check their files with these digests) and the
checkpoint writer (which records them) both import it, and not each other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """One digest over the relative names and contents of the files below `root`."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in patterns for p in root.rglob(pattern) if p.is_file()})
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def local_source_digest(path: Path, split: str) -> str | None:
    """Digest of a local prompt source as stage 3 read it (file, saved dataset or directory of
    files); None for a Hub id, whose content the Hub versions by revision."""
    if path.is_file():
        return f"file:{sha256_file(path)}"
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        return f"saved:{sha256_tree(path / split)}"
    if (path / "state.json").is_file():
        return f"saved:{sha256_tree(path)}"
    return f"files:{sha256_tree(path)}"
