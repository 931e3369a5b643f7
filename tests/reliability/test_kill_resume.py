"""`ppoflow train` killed at random moments, and its newest checkpoint damaged: nothing is lost.

Every interrupted run is restarted with the same command until it finishes; the result must be the
uninterrupted reference run bit for bit (final policy tensors, every update's metrics once, eval).
Kill moments are drawn from a seed that changes every run (`PPOFLOW_RELIABILITY_SEED` replays one)
and cover every phase: starting up, training, writing a checkpoint (a `.partial-*` directory is on
disk), evaluating (after the last checkpoint, before eval.json) and saving the final policy.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ppoflow.checkpoint import verify_checkpoint
from tests.reliability.helpers import (
    NUM_UPDATES,
    assert_same_run,
    checkpoint_steps,
    partial_checkpoints,
    read_metrics,
    snapshot,
    wait_for,
)

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("PPOFLOW_RELIABILITY_SEED", time.time_ns() % 1_000_000))
STAGE_TIMEOUT = 600.0


def _kill_when(child, condition: Callable[[], Any]) -> bool:
    """SIGKILL `child` the moment `condition()` holds; False when it exited on its own first."""
    if not wait_for(condition, STAGE_TIMEOUT, alive=lambda: child.poll() is None):
        return False
    try:
        os.kill(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return child.wait(60) == -signal.SIGKILL


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return 0


class Restart:
    """One restarted `ppoflow train` and what its files looked like when it started."""

    def __init__(self, child, output_dir: Path, log: Path):
        self.child, self.output_dir, self.log = child, output_dir, log
        self.before = snapshot(output_dir)
        self.metrics_mtime = _mtime(output_dir / "metrics.jsonl")
        self.log_offset = log.stat().st_size if log.exists() else 0
        self.evaluating = False  # set by `while_evaluating` once stage 6 is seen to have begun
        self.final_inodes = self.final_writes()

    def final_writes(self) -> tuple[int, int]:
        """Identity of `.partial-final` and `final/`: both are made anew by each save (a leftover
        of a killed run is removed first), so a change means this restart is saving."""
        return _inode(self.output_dir / ".partial-final"), _inode(self.output_dir / "final")

    def saving_final(self) -> bool:
        partial, final = self.final_writes()
        return (partial and partial != self.final_inodes[0]) or (final and final != self.final_inodes[1])

    def new_log(self) -> str:
        with open(self.log, errors="replace") as handle:
            handle.seek(self.log_offset)
            return handle.read()

    def training_began(self) -> bool:
        """metrics.jsonl changed: the resumed run dropped lines past its checkpoint or appended one."""
        return _mtime(self.output_dir / "metrics.jsonl") != self.metrics_mtime

    def phase(self) -> str:
        """What the run was doing, read from its files (after the kill: nothing moves any more)."""
        now = snapshot(self.output_dir)
        if set(now["partial"]) - set(self.before["partial"]):
            return "checkpoint-write"
        if self.saving_final():
            return "final-save" if _inode(self.output_dir / "final") == self.final_inodes[1] else "after final-save"
        if self.evaluating:
            return "evaluation" if not now["eval_json"] else "after evaluation"
        if self.training_began() or max(now["steps"], default=0) > max(self.before["steps"], default=0):
            return "training"
        return "startup"


def while_starting(run: Restart, rng: random.Random) -> bool:
    """A random moment of the first seconds (loading models, preparing data, finding the checkpoint),
    or the first update, if the restart gets there first."""
    delay = rng.uniform(0.2, 2.0)
    return _kill_when(run.child, lambda: time.monotonic() - run.child.started >= delay or run.training_began())


def while_training(run: Restart, rng: random.Random) -> bool:
    """A random moment of the update after the restart's first (a fraction of that update's duration),
    so that a kill costs at most two updates of progress however fast the machine is."""
    fraction = rng.random()
    began: list[float] = []

    def mid_update() -> bool:
        if not began:
            if run.training_began():
                rows = read_metrics(run.output_dir)
                began.append(time.monotonic() + fraction * (rows[-1]["timing/step"] if rows else 0.5))
            return False
        return time.monotonic() >= began[0]

    return _kill_when(run.child, mid_update)


def while_writing_a_checkpoint(run: Restart, rng: random.Random) -> bool:
    """While the restart's second checkpoint is being written (so that each such kill still advances)."""
    done = max(run.before["steps"], default=0)
    pattern = re.compile(r"\.partial-step-(\d+)-")

    def writing() -> bool:
        return any(
            int(match.group(1)) > done + 1
            for name in partial_checkpoints(run.output_dir)
            if (match := pattern.match(name))
        )

    return _kill_when(run.child, writing)


def while_evaluating(run: Restart, rng: random.Random) -> bool:
    """Evaluating: the last checkpoint is on disk, stage 6 has begun (its start line since the restart),
    no eval.json.
    Should evaluation beat the random delay, the kill lands at once instead (and is counted as such)."""
    delay = rng.uniform(0.0, 0.3)
    began: list[float] = []

    def evaluating() -> bool:
        if not began:
            if NUM_UPDATES in checkpoint_steps(run.output_dir) and "[6/6] save_and_evaluate …" in run.new_log():
                began.append(time.monotonic())
                run.evaluating = True
            return False
        return time.monotonic() - began[0] >= delay or (run.output_dir / "eval.json").exists()

    return _kill_when(run.child, evaluating)


def while_saving_the_final_policy(run: Restart, rng: random.Random) -> bool:
    """While final/ is written (`.partial-final`), or at once after it, should the write beat the poll."""
    return _kill_when(run.child, run.saving_final)


def test_sigkill_at_random_moments_then_every_restart_resumes_bitwise(reference, train_run, faults):
    rng = random.Random(SEED)
    schedule = [
        while_starting,
        while_writing_a_checkpoint,
        while_training,
        while_starting,
        while_writing_a_checkpoint,
        while_training,
        while_writing_a_checkpoint,
        while_starting,
        while_training,
        while_writing_a_checkpoint,
        while_training,
        while_writing_a_checkpoint,
        while_evaluating,
        while_evaluating,
        while_saving_the_final_policy,
        while_starting,
    ]
    kills: list[dict[str, Any]] = []
    for attempt, trigger in enumerate(schedule):
        run = Restart(*train_run("killed"))
        if not trigger(run, rng):
            break
        kills.append(
            {
                "attempt": attempt,
                "trigger": trigger.__name__,
                "moment": run.phase(),
                "steps_before": run.before["steps"],
            }
        )
        faults.injected("sigkill: ppoflow train", moment=kills[-1]["moment"], trigger=trigger.__name__, seed=SEED)
    else:
        run = Restart(*train_run("killed"))
    output_dir, log = run.output_dir, run.log
    assert run.child.wait(STAGE_TIMEOUT) == 0, f"seed {SEED}: the final restart failed:\n{log.read_text()[-3000:]}"

    moments = [kill["moment"] for kill in kills]
    assert len(kills) >= 10, f"seed {SEED}: only {len(kills)} kills landed: {kills}"
    assert moments.count("checkpoint-write") >= 3 and "evaluation" in moments and "training" in moments, (
        f"seed {SEED}: {kills}"
    )
    assert_same_run(reference, output_dir)
    assert not partial_checkpoints(output_dir), "a .partial checkpoint was left behind"
    assert log.read_text().count("resuming from step-") >= 4  # restarts picked up where the killed ones stopped


FLIP = "a byte flipped in the policy weights"
TRUNCATE = "the optimizer state cut in half"
GARBAGE = "manifest.json overwritten with garbage"


def damage(checkpoint: Path, how: str) -> str:
    if how == FLIP:
        target = checkpoint / "policy" / "model.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        return "policy/model.safetensors does not match its checksum"
    if how == TRUNCATE:
        target = checkpoint / "optimizer.pt"
        os.truncate(target, target.stat().st_size // 2)
        return "optimizer.pt does not match its checksum"
    (checkpoint / "manifest.json").write_text('{"format": 1, "files": ')
    return "manifest.json is unreadable"


def test_a_corrupt_or_truncated_newest_checkpoint_is_skipped_for_the_previous_good_one(reference, train_run, faults):
    # Stop the run (SIGKILL) right after checkpoint N is in place, damage it, restart: the restart
    # must report it, resume from N-1, and write N anew. Three times, three kinds of damage.
    child, output_dir, log = train_run("corrupted")
    for stop_at, how in ((2, FLIP), (4, TRUNCATE), (6, GARBAGE)):
        # The conditions are polled within this iteration; the defaults bind its values (ruff B023).
        assert _kill_when(
            child, lambda stop_at=stop_at, output_dir=output_dir: stop_at in checkpoint_steps(output_dir)
        ), log.read_text()[-3000:]
        faults.injected("sigkill: ppoflow train", moment="just after a checkpoint")
        newest = output_dir / "checkpoints" / f"step-{stop_at:06d}"
        verify_checkpoint(newest)
        reason = damage(newest, how)
        faults.injected("damaged newest checkpoint", damage=how, step=stop_at)
        seen = len(log.read_text())

        child, output_dir, log = train_run("corrupted")
        resumed = f"resuming from step-{stop_at - 1:06d} (update {stop_at - 1} of {NUM_UPDATES})"
        assert wait_for(
            lambda resumed=resumed, log=log, seen=seen: resumed in log.read_text()[seen:],
            STAGE_TIMEOUT,
            interval=0.05,
            alive=lambda child=child: child.poll() is None,
        ), log.read_text()[seen:][-3000:]
        assert f"skipping unusable checkpoint: {newest}: {reason}" in log.read_text()[seen:]
        assert wait_for(
            lambda stop_at=stop_at, output_dir=output_dir: stop_at + 1 in checkpoint_steps(output_dir),
            STAGE_TIMEOUT,
            interval=0.05,
        )
        verify_checkpoint(newest)  # written anew by the resumed run: intact
    assert child.wait(STAGE_TIMEOUT) == 0, log.read_text()[-3000:]
    assert_same_run(reference, output_dir)
