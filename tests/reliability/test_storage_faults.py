"""A disk that fills up and an output directory that turns read-only, for real (a small tmpfs, a
read-only bind mount; these tests need root/CAP_SYS_ADMIN and skip, saying so, without it).

The run stops with one clear line naming `output_dir` and the problem, every checkpoint written
before stays intact, and once the disk has room (or is writable) again the same command resumes
and finishes bit for bit like the uninterrupted run.
"""

from __future__ import annotations

import pytest

from ppoflow.checkpoint import verify_checkpoint
from tests.reliability.helpers import (
    assert_same_run,
    bind_mount,
    checkpoint_steps,
    error_lines,
    require_mounts,
    resize_tmpfs,
    set_read_only,
    small_tmpfs,
    wait_for,
)

pytestmark = pytest.mark.slow

MB = 1 << 20
TIMEOUT = 600.0


def assert_intact(output_dir, steps: list[int]) -> None:
    root = output_dir / "checkpoints"
    for step in steps:
        verify_checkpoint(root / f"step-{step:06d}")


def test_a_full_disk_stops_the_run_clearly_and_keeps_its_checkpoints(reference, train_run, tmp_path, faults):
    require_mounts(tmp_path)
    # Room for the prepared data, the step-0 checkpoint (7 MB: no optimizer state yet) and one full
    # checkpoint (22 MB), not for a second: the disk fills up while checkpoint 2 is written.
    with small_tmpfs(tmp_path / "disk", 40 * MB) as disk:
        output_dir = disk / "run"
        child, output_dir, log = train_run("full", output_dir=output_dir)
        assert child.wait(TIMEOUT) == 2, log.read_text()[-3000:]
        faults.injected("disk full", where="writing checkpoint 2")
        (line,) = error_lines(log.read_text())
        assert line.startswith(
            "error: cannot write checkpoint step-000002 in "
            f"{output_dir / 'checkpoints'}: no space left on the device — "
        )
        assert "the earlier checkpoints are intact" in line
        assert "Traceback" not in log.read_text()
        assert checkpoint_steps(output_dir) == [0, 1]
        assert_intact(output_dir, [0, 1])

        resize_tmpfs(disk, 256 * MB)  # space freed: the same command again
        child, output_dir, log = train_run("full", output_dir=output_dir)
        assert child.wait(TIMEOUT) == 0, log.read_text()[-3000:]
        assert "resuming from step-000001 (update 1 of 8)" in log.read_text()
        assert_same_run(reference, output_dir)


def test_an_output_dir_turned_read_only_mid_run_stops_clearly_and_keeps_its_checkpoints(
    reference, train_run, tmp_path, faults
):
    require_mounts(tmp_path)
    with bind_mount(tmp_path / "storage", tmp_path / "mounted") as mounted:
        child, output_dir, log = train_run("read-only", output_dir=mounted / "run")
        assert wait_for(
            lambda: 3 in checkpoint_steps(output_dir), TIMEOUT, interval=0.005, alive=lambda: child.poll() is None
        )
        set_read_only(mounted, True)
        faults.injected("output_dir read-only", where="mid-training, after checkpoint 3")
        assert child.wait(TIMEOUT) == 2, log.read_text()[-3000:]
        (line,) = error_lines(log.read_text())
        assert "read-only" in line and str(output_dir) in line and " — " in line, line
        assert "Traceback" not in log.read_text()
        kept = checkpoint_steps(output_dir)
        assert 3 in kept
        assert_intact(output_dir, kept)

        set_read_only(mounted, False)
        child, output_dir, log = train_run("read-only", output_dir=output_dir)
        assert child.wait(TIMEOUT) == 0, log.read_text()[-3000:]
        assert_same_run(reference, output_dir)


def test_a_read_only_output_dir_is_refused_before_any_work(train_run, tmp_path, faults):
    require_mounts(tmp_path)
    with bind_mount(tmp_path / "storage", tmp_path / "mounted") as mounted:
        set_read_only(mounted, True)
        child, output_dir, log = train_run("read-only-at-start", output_dir=mounted / "run")
        faults.injected("output_dir read-only", where="at start")
        assert child.wait(TIMEOUT) == 2, log.read_text()[-3000:]
        (line,) = error_lines(log.read_text())
        assert line == (
            f"error: config field `output_dir`: {output_dir} is not writable "
            "(Read-only file system) — choose a directory you can write to"
        )
        assert not output_dir.exists()
