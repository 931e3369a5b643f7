"""Three `ppoflow train` of the same config started at once, on one output directory.

One holds `OUTPUT/.lock` and trains; the second waits for it, then reuses the finished training
(no update is trained twice, no checkpoint written by it); the third, with
`flow.lock_timeout_seconds=0`, fails at once with one line naming the holder. A watcher polls the
checkpoint directory every millisecond: no two processes ever write checkpoints, and no two
partial checkpoints ever coexist.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from tests.reliability.helpers import assert_same_run, error_lines, partial_checkpoints, wait_for

pytestmark = pytest.mark.slow

PARTIAL = re.compile(r"\.partial-step-(\d+)-(\d+)$")


def lock_holder(output_dir) -> int | None:
    """The pid the lock's holder wrote into OUTPUT/.lock."""
    try:
        return json.loads((output_dir / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


class CheckpointWriters(threading.Thread):
    """Which pids wrote partial checkpoints, and whether two were ever on disk at once."""

    def __init__(self, output_dir):
        super().__init__(daemon=True)
        self.output_dir = output_dir
        self.pids: set[int] = set()
        self.overlaps: list[list[str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            names = partial_checkpoints(self.output_dir)
            self.pids |= {int(match.group(2)) for name in names if (match := PARTIAL.match(name))}
            if len(names) > 1:
                self.overlaps.append(names)
            time.sleep(0.001)


def test_a_second_run_waits_and_reuses_and_a_third_without_patience_fails_clearly(
    reference, train_run, tmp_path, faults
):
    output_dir = tmp_path / "shared"
    watcher = CheckpointWriters(output_dir)
    watcher.start()
    first = train_run("first", output_dir=output_dir)
    second = train_run("second", output_dir=output_dir)
    faults.injected("concurrent run of the same config", waits=True)
    holder_pid = wait_for(
        lambda: lock_holder(output_dir) in (first[0].pid, second[0].pid) and lock_holder(output_dir), 300, interval=0.01
    )
    assert holder_pid, "neither run took the lock"

    impatient, _, impatient_log = train_run("impatient", "flow.lock_timeout_seconds=0", output_dir=output_dir)
    faults.injected("concurrent run of the same config", waits=False)
    assert impatient.wait(300) == 2, impatient_log.read_text()[-3000:]
    (line,) = error_lines(impatient_log.read_text())
    assert re.fullmatch(
        rf"error: config field `output_dir`: {output_dir} is in use by another run \(pid "
        rf"{holder_pid} on \S+ since \S+Z; waited 0 s of flow\.lock_timeout_seconds=0\) "
        r"— wait for that run to finish and run again .*, or choose another output_dir",
        line,
    ), line
    assert impatient.pid not in watcher.pids

    codes = {child.pid: child.wait(600) for child, *_ in (first, second)}
    watcher.stop.set()
    watcher.join()
    assert all(code == 0 for code in codes.values()), [log.read_text()[-2000:] for _, _, log in (first, second)]
    (holder,) = [run for run in (first, second) if run[0].pid == holder_pid]
    (waiter,) = [run for run in (first, second) if run[0].pid != holder_pid]
    waiter_log = waiter[2].read_text()
    assert (
        f"{output_dir} is in use by another run (pid {holder_pid} on" in waiter_log
        and "waiting for it to finish" in waiter_log
    )
    assert "resuming from" not in waiter_log and not re.search(r"(^|\r)ppo:", waiter_log, re.M)  # no training bar
    assert watcher.pids == {holder_pid}, f"checkpoints written by {watcher.pids}, the lock holder is {holder_pid}"
    assert not watcher.overlaps, watcher.overlaps[:3]
    assert_same_run(reference, output_dir)
