"""An episode's total score (`rewards.score`), by hand: the reward model's score, plus each reward
function's value times its weight, minus the missing-EOS penalty where the response did not finish."""

import torch

from ppoflow.rewards import LoadedRewardFunction, score


def test_the_total_adds_weighted_functions_and_takes_the_penalty_off_unfinished_responses():
    seen = []

    def length(prompts, completions):
        seen.append((prompts, completions))
        return [float(len(text)) for text in completions]

    functions = [
        LoadedRewardFunction("length", 0.5, length),
        LoadedRewardFunction("logged", 0.0, lambda prompts, completions: [7.0, 8.0]),
    ]
    scores = score(
        torch.tensor([1.0, -0.5]),
        torch.tensor([True, False]),
        ["p1", "p2"],
        ["ab", "abcd"],
        reward_functions=functions,
        missing_eos_penalty=1.0,
    )
    # 1.0 + 0.5 * 2 + 0 * 7 = 2.0 (finished); -0.5 + 0.5 * 4 + 0 * 8 - 1.0 = 0.5 (no EOS)
    assert scores.total.tolist() == [2.0, 0.5]
    assert {name: values.tolist() for name, values in scores.by_function.items()} == {
        "length": [2.0, 4.0],
        "logged": [7.0, 8.0],
    }
    assert seen == [(["p1", "p2"], ["ab", "abcd"])]


def test_without_a_penalty_or_functions_the_total_is_the_reward_models_score_and_a_copy():
    rm_scores = torch.tensor([0.25, -1.0])
    scores = score(
        rm_scores, torch.tensor([False, False]), ["a", "b"], ["x", "y"], reward_functions=[], missing_eos_penalty=None
    )
    assert scores.total.tolist() == [0.25, -1.0] and scores.by_function == {}
    scores.total.add_(1.0)
    assert rm_scores.tolist() == [0.25, -1.0]
