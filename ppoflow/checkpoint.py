"""Atomic, checksummed training checkpoints.

A checkpoint is a directory `checkpoints/step-NNNNNN/` holding the policy (or LoRA adapter) and
value model as safetensors, the optimizer and scheduler states, every process's RNG states and
`state.json` (counters). It is written under a `.partial-*` name, every file fsynced, then a
`manifest.json` with each file's sha256 is written last and the directory renamed into place.
A directory without a manifest, or whose files no longer match it, is never loaded: the loader
reports it and falls back to the previous good one. Tensors are loaded with `weights_only=True`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ppoflow.atomic import remove_directory, remove_leftovers, write_directory
from ppoflow.errors import CheckpointError
from ppoflow.hashing import sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"
LOW_SPACE_BYTES = 1 << 20  # below this, a failed write is put down to a full disk


def checkpoint_dir(root: Path, update: int) -> Path:
    return root / f"step-{update:06d}"


def capture_rng() -> dict[str, Any]:
    """This process's torch random number generator states (CPU and CUDA): all the engine draws
    from. Python's `random` is left out: other threads (the orchestrator's) draw from it, so it
    would make identical checkpoints differ."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> dict[str, str]:
    """fsync every file below root and return their sha256 by relative path."""
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        digests[str(path.relative_to(root))] = sha256_file(path)
    return digests


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, update: int, write_payload: Callable[[Path], None], state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically. `write_payload(tmp_dir)` saves models and tensors into tmp_dir;
    `state` (the counters) goes to `state.json`, and `manifest.json`, written last, seals it."""
    final = checkpoint_dir(root, update)

    def write(partial: Path) -> None:
        try:
            write_payload(partial)
            (partial / STATE).write_text(json.dumps(state, indent=2, sort_keys=True))
            files = _fsync_tree(partial)
            manifest = {"format": FORMAT_VERSION, "update": update, "files": files}
            with open(partial / MANIFEST, "w") as handle:
                json.dump(manifest, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
        except Exception as exc:
            problem = storage_problem(root, exc)  # asked before the cleanup frees the space
            if problem is not None:
                raise CheckpointError(
                    f"cannot write checkpoint {final.name} in {root}: {problem} — free space "
                    "or make it writable (or choose another output_dir), then run again: "
                    "the earlier checkpoints are intact and training resumes from the newest"
                ) from exc
            raise

    write_directory(final, write, suffix=f"-{os.getpid()}")
    _fsync_dir(root)
    return final


def save_training_state(
    directory: Path,
    *,
    policy,
    value,
    optimizer_state: dict[str, Any],
    scheduler,
    rng_states: list[dict[str, Any]],
    policy_state: dict[str, torch.Tensor] | None = None,
    value_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """A training checkpoint's payload: the policy (or its LoRA adapter) and the value model in
    Hugging Face format (safetensors), the optimizer and scheduler states, and every process's RNG
    states (a list by process index). `policy_state`/`value_state`: the models' full weights when
    the models themselves hold shards (`runtime.fsdp`); None: their own."""
    policy.save_pretrained(directory / "policy", safe_serialization=True, state_dict=policy_state)
    value.save_pretrained(directory / "value", safe_serialization=True, state_dict=value_state)
    torch.save(optimizer_state, directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    torch.save(rng_states, directory / "rng.pt")


def load_training_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The optimizer state, scheduler state and per-process RNG states `save_training_state` wrote
    (the weights are loaded with the models)."""
    return tuple(load_tensors(checkpoint / name) for name in ("optimizer.pt", "scheduler.pt", "rng.pt"))


def storage_problem(path: Path, exc: BaseException) -> str | None:
    """Why a write below `path` failed when the file system is the cause (full, read-only, not
    permitted); None otherwise. torch.save and safetensors wrap the OS error (torch's reads
    "unexpected pos"), so the file system itself is asked too."""
    code, filename = getattr(exc, "errno", None), getattr(exc, "filename", None)
    ours = filename is None or Path(os.path.abspath(filename)).is_relative_to(Path(path).absolute())
    if ours and code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if ours and code == errno.EROFS:
        return "the file system is read-only"
    if ours and code in (errno.EACCES, errno.EPERM) and filename is not None:
        return f"permission denied on {filename}"
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        stats = os.statvfs(existing)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return "the file system is read-only"
    if stats.f_bavail * stats.f_frsize < LOW_SPACE_BYTES:
        return "no space left on the device"
    return None


def verify_checkpoint(path: Path) -> str:
    """Check every file against the manifest; return the manifest's digest (the checkpoint's identity)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (an interrupted write)")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{path}: {MANIFEST} is unreadable") from None
    for relative, expected in files.items():
        file = path / relative
        if not file.is_file():
            raise CheckpointError(f"{path}: {relative} is missing")
        if sha256_file(file) != expected:
            raise CheckpointError(f"{path}: {relative} does not match its checksum")
    return hashlib.sha256(raw).hexdigest()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, newest first (not yet verified)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def newest_valid_checkpoint(root: Path) -> tuple[Path, str] | None:
    """The newest checkpoint that verifies, skipping (and reporting) corrupt or partial ones."""
    for path in list_checkpoints(root):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping unusable checkpoint: %s", exc)
    return None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text())


def newest_state(root: Path) -> dict[str, Any] | None:
    """The state file of the newest checkpoint that has a readable one, unverified: what stage 1 needs
    to tell whose checkpoints these are (config hash, processes) without hashing gigabytes of weights,
    which stages 4 and 5 verify before they load them."""
    for path in list_checkpoints(root):
        try:
            return read_state(path)
        except (OSError, ValueError):
            log.warning("skipping a checkpoint without a readable %s: %s", STATE, path)
    return None


def load_tensors(path: Path) -> Any:
    """Optimizer, scheduler or RNG state saved with torch.save; never unpickled beyond tensors."""
    return torch.load(path, map_location="cpu", weights_only=True)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, each renamed aside before it is deleted, so that none is
    ever left half deleted under its name. Step 0 (the initial state) is always kept. A checkpoint that
    cannot be moved (a read-only file system) stays whole, with a warning."""
    for path in list_checkpoints(root)[keep:]:
        if path.name != checkpoint_dir(root, 0).name:
            try:
                remove_directory(path)
            except OSError as exc:
                log.warning("old checkpoint %s not deleted: %s", path, exc)
    remove_leftovers(root)
