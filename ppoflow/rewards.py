"""Python reward functions named in the config as `module:function`, and an episode's total score.

Each is called with the batch's prompt texts and completion texts and returns one float per pair.
Its value is added to the reward-model score with the configured weight (0: logged only).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ppoflow.config import RewardFunctionConfig
from ppoflow.errors import ConfigError

RewardFunction = Callable[[list[str], list[str]], list[float]]


@dataclass(frozen=True)
class LoadedRewardFunction:
    metric_name: str
    weight: float
    function: RewardFunction


def import_reward_function(index: int, path: str) -> RewardFunction:
    """Import `package.module:function`, with an error naming the config entry when it fails."""
    field = f"reward_functions.{index}.path"
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            field, f"cannot import module {module_name!r} ({exc})", "check the module path and that it is installed"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(
            field,
            f"{module_name!r} has no callable {attribute!r}",
            "name a function with signature (prompts, completions) -> list[float]",
        )
    return function


def load_reward_functions(configs: list[RewardFunctionConfig]) -> list[LoadedRewardFunction]:
    names = [config.metric_name for config in configs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(
            "reward_functions", f"metric names {duplicates} are used twice", "give each entry a distinct `name`"
        )
    return [
        LoadedRewardFunction(config.metric_name, config.weight, import_reward_function(index, config.path))
        for index, config in enumerate(configs)
    ]


@dataclass(frozen=True)
class Scores:
    """What a batch of episodes scored: the total PPO maximises, and each reward function's own value."""

    total: torch.Tensor  # [B]
    by_function: dict[str, torch.Tensor]  # metric name -> [B]


def score(
    rm_scores: torch.Tensor,
    complete: torch.Tensor,
    prompts: list[str],
    completions: list[str],
    *,
    reward_functions: list[LoadedRewardFunction],
    missing_eos_penalty: float | None,
) -> Scores:
    """Each episode's total score: the reward model's, plus every reward function's value times its
    weight, minus `missing_eos_penalty` where the response does not hold the completion token."""
    total = rm_scores.clone()
    by_function = {}
    for reward_function in reward_functions:
        values = torch.tensor(reward_function.function(prompts, completions), dtype=torch.float32, device=total.device)
        by_function[reward_function.metric_name] = values
        total = total + reward_function.weight * values
    if missing_eos_penalty is not None:
        total = total - missing_eos_penalty * (~complete).float()
    return Scores(total, by_function)
