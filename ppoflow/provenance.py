"""Which code made a result: the git state of the checkout and the versions of the libraries.

MLflow runs carry both as params and tags (`ppoflow.tracking`); the benchmark records the git state
beside its numbers (`benchmarks/run.py`). Nothing here imports a heavy library.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

LIBRARIES = ("torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "mlflow", "prefect")
REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GitState:
    """HEAD of a checkout and the paths `git status --porcelain` lists (a rename shows as `old -> new`)."""

    commit: str
    changed: tuple[str, ...]
    untracked: tuple[str, ...]

    @property
    def dirty(self) -> bool:
        """Tracked files differ from HEAD (untracked files do not count)."""
        return bool(self.changed)


def git_state(directory: Path = REPOSITORY) -> GitState | None:
    """The state of the git checkout at `directory` (default: the one holding ppoflow); None outside one."""
    try:
        commit = _git(directory, "rev-parse", "HEAD").strip()
        status = _git(directory, "status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    entries = [(line[:2], line[3:]) for line in status.splitlines() if line.strip()]
    return GitState(
        commit=commit,
        changed=tuple(path for code, path in entries if code != "??"),
        untracked=tuple(path for code, path in entries if code == "??"),
    )


def _git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=5, check=True).stdout


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a run (absent ones are skipped)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@functools.cache
def engine_identity(package: Path = REPOSITORY / "ppoflow") -> str:
    """ppoflow's version and a digest of the engine's source (every `ppoflow/**/*.py`, by relative
    path and content): what a cached stage result depends on besides its inputs, so an upgraded or
    edited engine never reuses results of the old one."""
    digest = hashlib.sha256(importlib.metadata.version("ppoflow").encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
