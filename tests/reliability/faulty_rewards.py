"""Reward functions that go wrong on purpose, for `reward_functions` entries with weight 1.0.

Rollouts call a reward function once per PPO update, so in a run started from scratch the n-th
call is update n. They are how tests inject faults into training: through the engine's public
hooks, never a test-only switch inside it.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

CRASH_ENV = "PPOFLOW_TEST_CRASH_AFTER"  # "<update>:<marker file>", read by `crash_once_after_update` only


class InjectedCrash(RuntimeError):
    """A crash injected on purpose; retryable like any other crash (not a user error)."""


GOOD_UPDATES = 2
_calls: dict[str, int] = {}


def _count(name: str) -> int:
    _calls[name] = _calls.get(name, 0) + 1
    return _calls[name]


def nan_after_two_updates(prompts: list[str], completions: list[str]) -> list[float]:
    """0.0 for two updates, then NaN: a reward that breaks."""
    value = 0.0 if _count("nan") <= GOOD_UPDATES else math.nan
    return [value] * len(completions)


def huge_after_two_updates(prompts: list[str], completions: list[str]) -> list[float]:
    """0.0 for two updates, then 3e38: finite, but its squared error overflows the value loss."""
    value = 0.0 if _count("huge") <= GOOD_UPDATES else 3e38
    return [value] * len(completions)


def crash_once_after_update(prompts: list[str], completions: list[str]) -> list[float]:
    """0.0, except that the rollout after update N crashes once (`PPOFLOW_TEST_CRASH_AFTER=N:MARKER`):
    the marker file records the crash, so a retry or a re-run in any process trains on."""
    after, marker = os.environ[CRASH_ENV].split(":", 1)
    if _count("crash") == int(after) + 1 and not Path(marker).exists():
        Path(marker).write_text("injected\n")
        raise InjectedCrash(f"crash injected after update {after}")
    return [0.0] * len(completions)


KILL_RANK_ENV = "PPOFLOW_TEST_KILL_RANK"  # "<rank>:<update>:<marker file>", read by `sigkill_rank_once_after_update`


def sigkill_rank_once_after_update(prompts: list[str], completions: list[str]) -> list[float]:
    """0.0; with `PPOFLOW_TEST_KILL_RANK=R:N:MARKER`, the process of rank R SIGKILLs itself in the
    rollout after update N, once (the marker file records it): a rank that dies as under the OOM killer."""
    spec = os.environ.get(KILL_RANK_ENV)
    if spec and _count("kill-rank") == int(spec.split(":", 2)[1]) + 1:
        rank, _, marker = spec.split(":", 2)
        if os.environ.get("RANK") == rank and not Path(marker).exists():
            Path(marker).write_text("killed\n")
            os.kill(os.getpid(), signal.SIGKILL)
    return [0.0] * len(completions)


HANG_RANK_ENV = "PPOFLOW_TEST_HANG_RANK"  # "<rank>:<update>", read by `hang_rank_after_update`


def hang_rank_after_update(prompts: list[str], completions: list[str]) -> list[float]:
    """0.0; with `PPOFLOW_TEST_HANG_RANK=R:N`, the process of rank R stops answering in the rollout
    after update N (it sleeps for an hour): a rank on a lost machine, or behind a stuck GPU."""
    spec = os.environ.get(HANG_RANK_ENV)
    if spec and _count("hang-rank") == int(spec.split(":")[1]) + 1 and os.environ.get("RANK") == spec.split(":")[0]:
        time.sleep(3600)
    return [0.0] * len(completions)
