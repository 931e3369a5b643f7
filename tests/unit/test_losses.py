"""Golden numbers for ppoflow.losses, worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from ppoflow.losses import (
    entropy_from_logits,
    first_true_index,
    holds_token,
    logprobs_of,
    policy_loss,
    response_mask,
    value_loss,
)

NAN, INF = float("nan"), float("inf")


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def bools(rows):
    return torch.tensor(rows, dtype=torch.bool)


def longs(rows):
    return torch.tensor(rows, dtype=torch.long)


def assert_close(actual, expected, atol=1e-12):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


# --- logprobs_of / entropy_from_logits --------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logprobs_of_two_way_by_hand(temperature):
    # logits / temperature = [0, log 3] -> softmax [1/4, 3/4]
    row = [0.0, temperature * math.log(3)]
    logits = f64([[row, row]]).requires_grad_()
    logprobs = logprobs_of(logits, longs([[1, 0]]), temperature)
    assert_close(logprobs, [[math.log(0.75), math.log(0.25)]])
    # d log p_k / d l_j = (1[j == k] - p_j) / temperature:
    # token 1 -> [-1/4, 1/4] / temperature, token 0 -> [3/4, -3/4] / temperature
    logprobs.sum().backward()
    assert_close(logits.grad, f64([[[-0.25, 0.25], [0.75, -0.75]]]) / temperature)


def test_logprobs_of_matches_log_softmax_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5), generator=generator)
    ours = logits.clone().requires_grad_()
    reference = logits.clone().requires_grad_()
    weights = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    expected = torch.log_softmax(reference / 0.7, -1).gather(-1, tokens[..., None]).squeeze(-1)
    actual = logprobs_of(ours, tokens, temperature=0.7)
    assert_close(actual, expected)
    (actual * weights).sum().backward()
    (expected * weights).sum().backward()
    assert_close(ours.grad, reference.grad)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_of_uniform_logits_is_log_vocab(temperature):
    logits = torch.full((2, 3, 7), 3.7, dtype=torch.float64)
    expected = torch.full((2, 3), math.log(7), dtype=torch.float64)  # -7 * (1/7) ln(1/7) = ln 7
    assert_close(entropy_from_logits(logits, temperature), expected)


def test_entropy_two_way_by_hand():
    # p = [1/4, 3/4]: H = 1/4 ln 4 + 3/4 ln(4/3) = 0.3465735903 + 0.2157615543 = 0.5623351446
    logits = f64([[[0.0, math.log(3)]]])
    assert_close(entropy_from_logits(logits), [[0.5623351446]], atol=1e-10)
    # temperature 2 on [0, 2 ln 3] gives the same distribution
    assert_close(entropy_from_logits(2 * logits, temperature=2.0), [[0.5623351446]], atol=1e-10)


# --- policy_loss ------------------------------------------------------------------------------


def test_policy_loss_clipped_regime_by_hand():
    # cliprange 0.2 -> ratio clamped to [0.8, 1.2]; the 5th token is padding full of garbage
    old_logprobs = f64([[0.0, 0.0, 0.0, 0.0, 1.0]])
    new_logprobs = f64([[math.log(1.5), math.log(1.1), math.log(0.5), math.log(1.5), NAN]])
    new_logprobs.requires_grad_()
    advantages = f64([[1.0, 1.0, -2.0, -2.0, INF]])
    mask = bools([[True, True, True, True, False]])
    loss, stats = policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # token  A   ratio  pg_loss1 = -A*r  pg_loss2 = -A*clamp(r)  max   clipped (pg_loss2 > pg_loss1)
    #  a    +1   1.5        -1.5            -1.2                -1.2   yes
    #  b    +1   1.1        -1.1            -1.1                -1.1   no (inside the range)
    #  c    -2   0.5         1.0             1.6                 1.6   yes
    #  d    -2   1.5         3.0             2.4                 3.0   no (pessimistic bound wins)
    # loss = (-1.2 - 1.1 + 1.6 + 3.0) / 4 = 2.3 / 4 = 0.575; clipfrac = 2 / 4
    assert_close(loss, 0.575)
    assert_close(stats["clipfrac"], 0.5)
    # logratio^2: ln1.5^2 = 0.1644019539, ln1.1^2 = 0.0090840304, ln0.5^2 = 0.4804530139,
    #             ln1.5^2 = 0.1644019539
    # sum 0.8183409521, mean 0.2045852380, approxkl = half = 0.1022926190
    assert_close(stats["approxkl"], 0.1022926190, atol=1e-10)
    # ratio mean (1.5 + 1.1 + 0.5 + 1.5) / 4 = 1.15;
    # population var (0.35^2 + 0.05^2 + 0.65^2 + 0.35^2) / 4
    #              = (0.1225 + 0.0025 + 0.4225 + 0.1225) / 4 = 0.67 / 4 = 0.1675
    assert_close(stats["ratio_mean"], 1.15)
    assert_close(stats["ratio_var"], 0.1675)
    assert not any(value.requires_grad for value in stats.values())
    # d loss / d new_logprob = -A * r / 4 where unclipped, 0 where clipped or padding:
    # a: 0, b: -1.1 / 4 = -0.275, c: 0, d: 2 * 1.5 / 4 = 0.75, padding: 0 (not NaN)
    loss.backward()
    assert_close(new_logprobs.grad, [[0.0, -0.275, 0.0, 0.75, 0.0]])


def test_policy_loss_unclipped_regime_by_hand():
    logprobs = f64([[-1.0, -2.0, -0.5, -3.0]])
    advantages = f64([[1.0, -2.0, 0.5, 42.0]])
    mask = bools([[True, True, True, False]])
    loss, stats = policy_loss(logprobs, logprobs, advantages, mask, cliprange=0.2)
    # ratio = 1 everywhere: loss = -mean(A) = -(1 - 2 + 0.5) / 3 = 0.5 / 3
    assert_close(loss, 0.5 / 3)
    assert_close(stats["clipfrac"], 0.0)
    assert_close(stats["approxkl"], 0.0)
    assert_close(stats["ratio_mean"], 1.0)
    assert_close(stats["ratio_var"], 0.0)


# --- value_loss -------------------------------------------------------------------------------


def test_value_loss_clipped_regime_by_hand():
    # cliprange_value 0.2; the 5th token is padding full of garbage
    old_values = f64([[1.0, 1.0, 0.0, 0.0, NAN]])
    new_values = f64([[1.5, 1.5, 0.1, -1.0, INF]]).requires_grad_()
    returns = f64([[2.0, 1.0, 1.0, -2.0, NAN]])
    mask = bools([[True, True, True, True, False]])
    loss, stats = value_loss(new_values, old_values, returns, mask, cliprange_value=0.2)
    # token old  new   R    v_clipped  vf_loss1       vf_loss2          max   clipped
    #  a    1.0  1.5   2.0    1.2      0.5^2 = 0.25   0.8^2 = 0.64      0.64  yes
    #  b    1.0  1.5   1.0    1.2      0.5^2 = 0.25   0.2^2 = 0.04      0.25  no
    #  c    0.0  0.1   1.0    0.1      0.9^2 = 0.81   0.81              0.81  no
    #  d    0.0 -1.0  -2.0   -0.2      1.0^2 = 1.0    1.8^2 = 3.24      3.24  yes
    # loss = 0.5 * (0.64 + 0.25 + 0.81 + 3.24) / 4 = 0.5 * 1.235 = 0.6175; clipfrac = 2 / 4
    assert_close(loss, 0.6175)
    assert_close(stats["clipfrac"], 0.5)
    assert not stats["clipfrac"].requires_grad
    # d loss / d new = 0.5 * 2 * (new - R) / 4 where unclipped, else 0:
    # a: 0, b: 0.5 / 4 = 0.125, c: -0.9 / 4 = -0.225, d: 0, padding: 0 (not NaN)
    loss.backward()
    assert_close(new_values.grad, [[0.0, 0.125, -0.225, 0.0, 0.0]])


def test_value_loss_unclipped_regime_by_hand():
    values, returns = f64([[1.0, 2.0, 5.0]]), f64([[0.0, 4.0, -5.0]])
    mask = bools([[True, True, False]])
    loss, stats = value_loss(values, values, returns, mask, cliprange_value=0.2)
    # 0.5 * ((1 - 0)^2 + (2 - 4)^2) / 2 = 0.5 * 5 / 2 = 1.25
    assert_close(loss, 1.25)
    assert_close(stats["clipfrac"], 0.0)


# --- token bookkeeping ------------------------------------------------------------------------


def test_first_true_index():
    rows = bools(
        [
            [False, True, True],
            [False, False, False],
            [True, False, False],
            [False, False, True],
        ]
    )
    assert first_true_index(rows).tolist() == [1, 3, 0, 2]


STOP, PAD = 2, 0


def test_response_mask_ends_at_the_first_stop_token():
    responses = longs(
        [
            [2, 5, 6, 2],  # stop at position 0
            [5, 6, 7, 8],  # no stop: every token is real
            [5, 6, 7, 2],  # stop at the last position
            [5, 2, 7, 2],  # two stops: the first one counts
        ]
    )
    assert response_mask(responses, longs([STOP])).tolist() == [
        [True, False, False, False],
        [True, True, True, True],
        [True, True, True, True],
        [True, True, False, False],
    ]
    assert response_mask(responses, longs([STOP])).dtype == torch.bool


def test_response_mask_without_a_stop_token_keeps_everything():
    # TRL's `stop_token: null`: nothing is truncated, EOS included
    responses = longs([[2, 5, 6], [5, 0, 7]])
    assert response_mask(responses, longs([])).tolist() == [[True] * 3, [True] * 3]


def test_response_mask_ignores_padding_and_keeps_a_stop_that_is_also_pad():
    # found from the stop token, never from padding: with pad == EOS the EOS is a response token
    # (TRL 1.12 would find the end at the first pad and drop the EOS from its mask)
    assert response_mask(longs([[5, 2, 2, 2]]), longs([2])).tolist() == [[True, True, False, False]]
    assert response_mask(longs([[5, 0, 7, 0]]), longs([STOP])).tolist() == [[True] * 4]


def test_missing_eos_penalty_goes_by_the_configured_stop_token():
    # stop_token_id = 9: responses are cut at the first 9; one that holds an EOS (2) but no 9 ran to
    # response_length without stopping, so it is incomplete and gets missing_eos_penalty (TRL: the
    # penalty is for responses that do not end with the stop token)
    responses = longs([[5, 9, 0, 0], [5, 2, 7, 8], [9, 0, 0, 0]])
    mask = response_mask(responses, longs([9]))
    assert holds_token(responses, mask, 9).tolist() == [True, False, True]
    # without a stop token, TRL's rule: complete when an EOS is anywhere in the response
    everything = response_mask(responses, longs([]))
    assert holds_token(responses, everything, 2).tolist() == [False, True, False]
    # padding never counts: a token past the real ones is not "held"
    assert holds_token(longs([[5, 2]]), torch.tensor([[True, False]]), 2).tolist() == [False]
