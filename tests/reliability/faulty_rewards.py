"""Reward functions that go wrong on purpose, for `reward_functions` entries with weight 1.0.

Rollouts call a reward function once per PPO update, so in a run started from scratch the n-th
call is update n.
"""

from __future__ import annotations

import math

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
