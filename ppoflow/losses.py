"""PPO's clipped losses and the token bookkeeping around them, as pure functions on tensors.

Shapes: `B` responses, `T` response tokens, `V` vocabulary. Every `mask` is a bool tensor, True
on a real response token; padding never enters a mean, and NaN/inf on padding cannot reach the
loss or its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppoflow.advantages import masked_mean, masked_var


def logprobs_of(logits: Tensor, tokens: Tensor, temperature: float = 1.0, rows_per_chunk: int = 256) -> Tensor:
    """Log-probability of `tokens` under softmax(logits / temperature); differentiable.

    `logits: [..., V]`, `tokens: [...]` integer -> `[...]`. No full log-prob tensor is built: the
    chosen logits are gathered, and logsumexp runs over chunks of `rows_per_chunk` positions so its
    temporaries stay `[rows_per_chunk, V]` (that bounds memory in no-grad rollouts; under autograd the
    chunks' inputs are kept for backward anyway). Each position's value does not depend on the chunking.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    token_logits = flat.gather(-1, tokens.reshape(-1, 1).long()).squeeze(-1) / temperature
    logsumexp = torch.cat([torch.logsumexp(chunk / temperature, dim=-1) for chunk in flat.split(rows_per_chunk)])
    return (token_logits - logsumexp).view(tokens.shape)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, rows_per_chunk: int = 256) -> Tensor:
    """Entropy of softmax(logits / temperature): logsumexp(l) - sum(softmax(l) * l), per position.

    `logits: [..., V]` (finite) -> `[...]`. Computed in chunks of positions, like `logprobs_of`.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for chunk in flat.split(rows_per_chunk):
        scaled = chunk / temperature
        entropies.append(torch.logsumexp(scaled, -1) - (torch.softmax(scaled, -1) * scaled).sum(-1))
    return torch.cat(entropies).view(logits.shape[:-1])


def policy_loss(
    new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss of PPO (Schulman et al. 2017), averaged over real tokens.

    All inputs `[B, T]`, `mask` bool. Returns `(loss, stats)`; stats are detached scalars:
    `clipfrac` (fraction of tokens where the clipped term is the active one), `approxkl`
    (0.5 * mean logratio^2), `ratio_mean`, and `ratio_var` (variance of the ratio over this batch's
    real tokens, unbiased=False). TRL's `val/ratio_var` is the variance of `ratio_mean` across
    micro-batches; the trainer computes that from the collected `ratio_mean`s.
    """
    # Padding may hold anything (TRL's INVALID_LOGPROB, NaN); zero it so no NaN reaches a gradient.
    logratio = torch.where(mask, new_logprobs - old_logprobs, 0.0)
    advantages = torch.where(mask, advantages, 0.0)
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), mask),
            "approxkl": 0.5 * masked_mean(logratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask, unbiased=False),
        }
    return loss, stats


def value_loss(
    new_values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of PPO: 0.5 * masked mean of max(unclipped, clipped) squared error.

    All inputs `[B, T]`, `mask` bool. Returns `(loss, stats)`; stats are detached scalars:
    `clipfrac` (fraction of tokens where the clipped error is the active one).
    """
    new_values, old_values, returns = (torch.where(mask, x, 0.0) for x in (new_values, old_values, returns))
    v_clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    vf_loss1 = (new_values - returns) ** 2
    vf_loss2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((vf_loss2 > vf_loss1).to(vf_loss1.dtype), mask)}
    return loss, stats


def first_true_index(bools: Tensor) -> Tensor:
    """Index of the first True in each row, or T if the row has none. `bools: [B, T]` -> `[B]`."""
    positions = torch.arange(bools.shape[-1], device=bools.device)
    return torch.where(bools, positions, bools.shape[-1]).min(dim=-1).values


def holds_token(responses: Tensor, response_mask: Tensor, token_id: int) -> Tensor:
    """[B] bool: the row has `token_id` among its real tokens. `responses, response_mask: [B, T]`."""
    return (responses == token_id).logical_and(response_mask).any(-1)


def response_mask(responses: Tensor, stop_token_ids: Tensor) -> Tensor:
    """The engine's one response mask: True up to and including each row's first stop token, and on
    every token of a row without one. `responses: [B, T]`, `stop_token_ids: [S]` (S = 0: no stop, TRL's
    `stop_token: null`, so every token is real) -> bool `[B, T]`.

    Ends are found from the stop tokens, never from padding: when pad == EOS the stop token is still a
    response token (TRL 1.12 finds the end at the first pad and so drops the EOS from its mask there,
    never training the policy to emit it).
    """
    is_stop = torch.isin(responses, stop_token_ids.to(device=responses.device, dtype=responses.dtype))
    lengths = (first_true_index(is_stop) + 1).clamp(max=responses.shape[-1])
    return torch.arange(responses.shape[-1], device=responses.device)[None, :] < lengths[:, None]
