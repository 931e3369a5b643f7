"""Rewards, KL penalty and advantages of a PPO rollout, as pure functions on tensors.

Shapes: `B` responses in the batch, `T` response tokens (right-padded). Every `mask` is a bool
tensor, True on a real response token and False on padding; masks are contiguous from the left
(True then False). Padding never enters a mean and every output is 0 on padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is True, over `dim` (all positions if None).

    `values: [...]`, `mask: [...]` bool, same shape. A slice with no True position gives NaN (0/0).
    Masked-out entries are replaced, not multiplied, so NaN/inf padding cannot leak into the sum.
    """
    if dim is None:
        return torch.where(mask, values, 0.0).sum() / mask.sum()
    return torch.where(mask, values, 0.0).sum(dim) / mask.sum(dim)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` over all positions where `mask` is True; a scalar.

    `unbiased` applies Bessel's correction n / (n - 1), as TRL's reward and advantage whitening do.
    """
    n = int(mask.sum())
    if n == 0:
        raise ValueError("masked_var: the mask selects no element; at least one True is needed")
    if unbiased and n == 1:
        raise ValueError(
            "masked_var: unbiased variance needs at least 2 masked elements, the mask selects 1; "
            "pass unbiased=False or a larger batch"
        )
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise `values` to unit variance over the masked positions; 0 on padding.

    With `shift_mean=False` the mean is added back (TRL's reward whitening keeps the reward's sign).
    `values: [B, T]`, `mask: [B, T]` bool.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy.

    Schulman's estimators (http://joschu.net/blog/kl-approx.html): "k1" = log p - log q is unbiased
    but can be negative; "k3" = (r - 1) - log r with r = q / p is unbiased and always >= 0.
    `logprobs: [B, T]`, `ref_logprobs: [B, T]` -> `[B, T]`.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        logr = ref_logprobs - logprobs
        return (torch.exp(logr) - 1) - logr
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}")


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward: -kl_coef * KL on every token, plus the score on the last real token.

    `scores: [B]`, `kl: [B, T]`, `mask: [B, T]` bool -> `(rewards [B, T], non_score_reward [B, T])`,
    both 0 on padding. Every row needs at least one real token.
    """
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        empty_rows = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(
            f"per_token_rewards: rows {empty_rows} have no real token; every response needs at "
            "least one unmasked token to carry its score"
        )
    non_score_reward = torch.where(mask, -kl_coef * kl, 0.0)
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(scores)), lengths - 1] += scores.to(rewards.dtype)
    return rewards, non_score_reward


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}.
    The episode ends at the last real token, so the value bootstrapped past it is 0.
    `rewards: [B, T]`, `values: [B, T]`, `mask: [B, T]` bool
    -> `(advantages [B, T], returns [B, T])`, both 0 on padding whatever `rewards` and `values`
    hold there.
    """
    rewards, values = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    lastgaelam = torch.zeros_like(deltas[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        lastgaelam = torch.where(mask[:, t], deltas[:, t] + gamma * lam * lastgaelam, 0.0)
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns
