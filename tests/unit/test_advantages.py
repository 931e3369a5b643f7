"""Golden numbers for ppoflow.advantages, worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from ppoflow.advantages import (
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
)

NAN, INF = float("nan"), float("inf")


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def bools(rows):
    return torch.tensor(rows, dtype=torch.bool)


def assert_close(actual, expected, atol=1e-12):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


# --- masked_mean / masked_var / masked_whiten ----------------------------------------------------


MASK = bools([[True, True, False], [True, False, False]])


@pytest.mark.parametrize("padding", [99.0, -7.0, NAN, INF])
def test_masked_mean_ignores_padding(padding):
    values = f64([[1.0, 2.0, padding], [4.0, padding, padding]])
    assert_close(masked_mean(values, MASK), 7 / 3)  # (1 + 2 + 4) / 3
    assert_close(masked_mean(values, MASK, dim=1), [1.5, 4.0])  # (1 + 2) / 2, 4 / 1


@pytest.mark.parametrize("padding", [100.0, NAN, INF])
def test_masked_var_biased_and_unbiased(padding):
    values, mask = f64([1.0, 2.0, 3.0, padding]), bools([True, True, True, False])
    # mean 2; squared deviations 1, 0, 1 -> sum 2; biased 2 / 3, unbiased 2 / (3 - 1) = 1
    assert_close(masked_var(values, mask, unbiased=False), 2 / 3)
    assert_close(masked_var(values, mask), 1.0)


def test_masked_var_errors():
    values = f64([1.0, 2.0])
    with pytest.raises(ValueError, match="no element"):
        masked_var(values, bools([False, False]))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(values, bools([True, False]))
    assert_close(masked_var(values, bools([True, False]), unbiased=False), 0.0)


@pytest.mark.parametrize("padding", [1000.0, NAN])
def test_masked_whiten_over_rows_with_padding(padding):
    values = f64([[1.0, 3.0, padding], [5.0, padding, padding]])
    mask = bools([[True, True, False], [True, False, False]])
    # masked {1, 3, 5}: mean 3; deviations -2, 0, 2; unbiased var (4 + 0 + 4) / 2 = 4, std 2
    # -> (x - 3) / 2 = -1, 0, 1 (rsqrt(4 + 1e-8) differs from 1/2 by ~6e-10); padding -> 0
    assert_close(masked_whiten(values, mask), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], atol=1e-8)
    # shift_mean=False adds the mean 3 back: -1 + 3, 0 + 3, 1 + 3; padding still 0
    assert_close(masked_whiten(values, mask, shift_mean=False), [[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]], atol=1e-8)


# --- kl_penalty -------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    logprobs = f64([math.log(0.5), math.log(0.25)])
    ref_logprobs = f64([math.log(0.25), math.log(0.5)])
    # k1 = log p - log q: log(0.5 / 0.25) = log 2 = 0.693147..., log(0.25 / 0.5) = -log 2 (k1 < 0)
    assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), [0.6931471805599453, -0.6931471805599453])
    # k3 = (r - 1) - log r, r = q / p: r = 0.5 -> -0.5 + log 2 = 0.193147...;
    #                                  r = 2   ->  1.0 - log 2 = 0.306853...
    assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), [0.1931471805599453, 0.3068528194400547])


def test_k3_is_nonnegative_and_zero_when_equal():
    generator = torch.Generator().manual_seed(0)
    logprobs = -5 * torch.rand(64, 16, generator=generator, dtype=torch.float64)
    ref_logprobs = -5 * torch.rand(64, 16, generator=generator, dtype=torch.float64)
    assert (kl_penalty(logprobs, ref_logprobs, "k3") >= 0).all()
    assert_close(kl_penalty(logprobs, logprobs, "k3"), torch.zeros(64, 16))


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(f64([0.0]), f64([0.0]), "k2")


# --- per_token_rewards ------------------------------------------------------------------------


def test_per_token_rewards_places_score_on_last_real_token():
    scores = f64([1.0, 2.0, 3.0])
    kl = f64([[0.1, 0.2, NAN], [0.4, 0.5, 0.6], [0.7, INF, INF]])
    mask = bools([[True, True, False], [True, True, True], [True, False, False]])
    rewards, non_score_reward = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    # non_score_reward = -0.5 * kl on real tokens, 0 on padding
    assert_close(non_score_reward, [[-0.05, -0.1, 0.0], [-0.2, -0.25, -0.3], [-0.35, 0.0, 0.0]])
    # score added at index mask.sum(1) - 1 = 1, 2, 0:
    # -0.1 + 1 = 0.9, -0.3 + 2 = 1.7, -0.35 + 3 = 2.65
    assert_close(rewards, [[-0.05, 0.9, 0.0], [-0.2, -0.25, 1.7], [2.65, 0.0, 0.0]])


def test_per_token_rewards_rejects_empty_rows():
    mask = bools([[True, False], [False, False]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(f64([1.0, 2.0]), f64([[0.0, 0.0], [0.0, 0.0]]), mask, kl_coef=0.1)


# --- gae --------------------------------------------------------------------------------------


def test_gae_one_row_by_hand():
    rewards, values, mask = f64([[0.1, 0.0, 1.0]]), f64([[0.5, 0.4, 0.2]]), bools([[True] * 3])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # gamma * lam = 0.45; no bootstrap past the end (V_3 = 0)
    # t=2: delta = 1.0 + 0.9*0   - 0.2 =  0.8;   A2 =  0.8
    # t=1: delta = 0.0 + 0.9*0.2 - 0.4 = -0.22;  A1 = -0.22 + 0.45*0.8  =  0.14
    # t=0: delta = 0.1 + 0.9*0.4 - 0.5 = -0.04;  A0 = -0.04 + 0.45*0.14 =  0.023
    assert_close(advantages, [[0.023, 0.14, 0.8]])
    # returns = A + V: 0.023 + 0.5, 0.14 + 0.4, 0.8 + 0.2
    assert_close(returns, [[0.523, 0.54, 1.0]])


def test_gae_with_padding_ignores_garbage():
    rewards = f64([[0.1, 0.0, 1.0, 3.0, INF], [2.0, NAN, 5.0, 5.0, 5.0]])
    values = f64([[0.5, 0.4, 0.2, 7.0, NAN], [0.5, -9.0, INF, 1.0, 1.0]])
    mask = bools([[True, True, True, False, False], [True, False, False, False, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0: the 1x3 case above, zeros on padding
    # row 1: one token, no bootstrap: delta = 2.0 - 0.5 = 1.5 = A0; return 1.5 + 0.5 = 2.0
    assert_close(advantages, [[0.023, 0.14, 0.8, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0, 0.0]])
    assert_close(returns, [[0.523, 0.54, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]])


def test_gae_gamma_lam_one_is_monte_carlo():
    rewards, values, mask = f64([[1.0, 2.0, 3.0]]), f64([[1.0, 1.0, 1.0]]), bools([[True] * 3])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # returns = reward-to-go: 1+2+3 = 6, 2+3 = 5, 3; advantages = returns - V = 5, 4, 2
    assert_close(returns, [[6.0, 5.0, 3.0]])
    assert_close(advantages, [[5.0, 4.0, 2.0]])


def test_score_placement_ours_and_trls_by_hand():
    # A response of 2 real tokens (the 2nd is EOS) in a width of 3; KL 0, score 1, gamma 1, lam 0.95;
    # the value model says V = [0.5, 0.25] on the real tokens and 0.1 at the position after EOS.
    gamma, lam = 1.0, 0.95
    values = f64([[0.5, 0.25, 0.1]])
    mask = bools([[True, True, False]])

    # ppoflow: the episode ends at EOS. r = [0, 1]; past the end V = 0.
    #   delta_1 = 1 + 0 - 0.25 = 0.75                     A_1 = 0.75
    #   delta_0 = 0 + 0.25 - 0.5 = -0.25                  A_0 = -0.25 + 0.95 * 0.75 = 0.4625
    #   returns = A + V = [0.9625, 1.0]: V(EOS) is trained toward the score itself.
    rewards, _ = per_token_rewards(f64([1.0]), f64([[0.0, 0.0, 0.0]]), mask, kl_coef=0.1)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    assert_close(advantages, f64([[0.4625, 0.75, 0.0]]))
    assert_close(returns, f64([[0.9625, 1.0, 0.0]]))

    # TRL 1.12 (ppo_trainer.py): the score goes one position later (sequence_length + 1, the first pad),
    # whose value is kept (`padding_mask_p1`), and GAE runs over the whole width:
    #   r = [0, 0, 1];  delta_2 = 1 - 0.1 = 0.9                      A_2 = 0.9
    #   delta_1 = 0 + 0.1 - 0.25 = -0.15                              A_1 = -0.15 + 0.95 * 0.9 = 0.705
    #   delta_0 = 0 + 0.25 - 0.5 = -0.25                              A_0 = -0.25 + 0.95 * 0.705 = 0.41975
    # The EOS token's advantage is 0.705 instead of 0.75: TRL discounts the score by gamma*lam and
    # bootstraps through a value at a padding position (trained one more value toward the score).
    trl_rewards = f64([[0.0, 0.0, 1.0]])
    trl_advantages, _ = gae(trl_rewards, values, bools([[True, True, True]]), gamma, lam)
    assert_close(trl_advantages, f64([[0.41975, 0.705, 0.9]]))
    assert advantages[0, 1] - trl_advantages[0, 1] == pytest.approx(0.75 - 0.705)
