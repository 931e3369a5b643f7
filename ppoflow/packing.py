"""Token layouts for the forwards over prompt+response (everything but generation).

A batch arrives as left-padded prompts `[B, Q]` and right-padded responses `[B, T]`. Laid out as
is, a row is as wide as the longest prompt plus the longest response, and on short responses most
cells are padding (the toy's are ~55 % padding) that every forward and backward pays for.

A `Layout` says where each sequence's tokens sit in the decoder's input and where to read its
outputs:

- `padded_layout`: one sequence per row, `[pad.. prompt response ..pad]`, with an attention mask;
  the classic layout, kept for models that do not honour packed position ids.
- `packed_layout`: sequences laid end to end in rows of a fixed capacity (first-fit decreasing),
  no attention mask; each sequence's positions restart at 0, which is how transformers' mask
  builder (`masking_utils.find_packed_sequence_indices`) knows where one sequence ends and the next
  begins, so no token attends across sequences. The rest of a row is filler that is its own
  sequence and is never read.

Either way a sequence sees the same tokens at the same positions, so its outputs are the same up
to floating-point summation order. `before` indexes, in the flattened `[R*C]` decoder output, the
state that predicts each real response token (in `response_mask` order); `last` the last real token
of each sequence (where the reward model's score is read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    input_ids: Tensor  # [R, C]
    position_ids: Tensor  # [R, C]
    attention_mask: Tensor | None  # [R, C] long for padded rows; None when packed
    before: Tensor  # [N] flat index of the state before each real response token (N = response_mask.sum())
    last: Tensor  # [B] flat index of each sequence's last real token
    response_mask: Tensor  # [B, T] bool

    def decoder_inputs(self) -> dict[str, Tensor | None]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def unflatten(self, flat: Tensor) -> Tensor:
        """`[N, ...]` values of the real response tokens -> `[B, T, ...]`, zero on padding (differentiable)."""
        mask = self.response_mask
        out = flat.new_zeros(*mask.shape, *flat.shape[1:])
        return out.masked_scatter(mask.view(*mask.shape, *([1] * (flat.dim() - 1))).expand_as(out), flat)


def trim_padding(queries: Tensor, query_mask: Tensor, responses: Tensor, response_mask: Tensor):
    """Drop query columns that are padding in every row and response columns past the longest response."""
    first_real = int((~query_mask.any(0)).long().cumprod(0).sum())
    longest = int(response_mask.sum(1).max())
    return queries[:, first_real:], query_mask[:, first_real:], responses[:, :longest], response_mask[:, :longest]


def padded_layout(queries: Tensor, query_mask: Tensor, responses: Tensor, response_mask: Tensor) -> Layout:
    """One sequence per row, padding trimmed to the batch's longest prompt and response; positions are
    counted from the first real token, the same positions `generate` used for left-padded prompts."""
    queries, query_mask, responses, trimmed_mask = trim_padding(queries, query_mask, responses, response_mask)
    attention_mask = torch.cat([query_mask, trimmed_mask], dim=1)
    rows, width = attention_mask.shape
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    prompt_width, response_width = queries.shape[1], responses.shape[1]
    row_start = torch.arange(rows, device=queries.device)[:, None] * width
    before_all = row_start + prompt_width - 1 + torch.arange(response_width, device=queries.device)[None, :]
    lengths = trimmed_mask.sum(1)
    return Layout(
        input_ids=torch.cat([queries, responses], dim=1),
        position_ids=position_ids,
        attention_mask=attention_mask.long(),
        before=before_all[trimmed_mask],
        last=row_start[:, 0] + prompt_width + lengths - 1,
        response_mask=_pad_columns(trimmed_mask, response_mask.shape[1]),
    )


def packed_layout(
    queries: Tensor,
    query_mask: Tensor,
    responses: Tensor,
    response_mask: Tensor,
    pad_token_id: int,
    row_tokens: int | None = None,
) -> Layout:
    """Sequences (real prompt tokens, then real response tokens) packed end to end, first-fit in
    decreasing length (deterministic), into rows of `row_tokens` (at least the longest sequence), or
    of the width `choose_row_tokens` picks when None."""
    device = queries.device
    prompt_lengths = query_mask.sum(1)
    response_lengths = response_mask.sum(1)
    lengths = prompt_lengths + response_lengths
    if row_tokens is None:
        capacity, (row_of, offset_of, used) = choose_row_tokens(lengths.tolist())
    else:
        capacity = max(int(row_tokens), int(lengths.max()))
        row_of, offset_of, used = _first_fit_decreasing(lengths.tolist(), capacity)
    num_rows = len(used)
    row_of = torch.tensor(row_of, device=device)
    starts = row_of * capacity + torch.tensor(offset_of, device=device)  # flat start of each sequence

    # Real tokens in row-major order: a row's prompt tokens end where its response tokens begin.
    tokens = torch.cat([queries, responses], dim=1)[torch.cat([query_mask, response_mask], dim=1)]
    within = torch.arange(tokens.numel(), device=device) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    destination = torch.repeat_interleave(starts, lengths) + within

    input_ids = torch.full((num_rows * capacity,), pad_token_id, dtype=tokens.dtype, device=device)
    input_ids[destination] = tokens
    # Filler after a row's last sequence counts from 0 too: a sequence of its own that nothing reads.
    used_per_row = torch.tensor(used, device=device)
    position_ids = (torch.arange(capacity, device=device)[None, :] - used_per_row[:, None]).flatten()
    position_ids[destination] = within
    response_width = response_mask.shape[1]
    before_all = (starts + prompt_lengths - 1)[:, None] + torch.arange(response_width, device=device)[None, :]
    return Layout(
        input_ids=input_ids.view(num_rows, capacity),
        position_ids=position_ids.view(num_rows, capacity),
        attention_mask=None,
        before=before_all[response_mask],
        last=starts + lengths - 1,
        response_mask=response_mask,
    )


def make_layout(
    queries: Tensor, query_mask: Tensor, responses: Tensor, response_mask: Tensor, *, packed: bool, pad_token_id: int
) -> Layout:
    if packed:
        return packed_layout(queries, query_mask, responses, response_mask, pad_token_id)
    return padded_layout(queries, query_mask, responses, response_mask)


# Attention runs over whole rows: a token in a row of C tokens costs about (1 + C / ATTENTION_TOKENS)
# of a token's dense work (4·C·d attention FLOPs against ~2·(4d² + 3·d·d_ff) per layer; 1024 is the toy
# model's ratio, conservative for larger models). Measured on the toy: rows of 128 tokens are ~10 %
# slower per token than rows of 64.
ATTENTION_TOKENS = 1024


def choose_row_tokens(lengths: list[int], max_multiple: int = 4) -> tuple[int, tuple[list[int], list[int], list[int]]]:
    """Row width (a multiple 1..`max_multiple` of the longest sequence) with the least estimated work
    (cells, weighted for attention); ties go to the narrower rows. Returns it and its packing."""
    longest = max(lengths)
    best = None
    for multiple in range(1, max_multiple + 1):
        capacity = longest * multiple
        packing = _first_fit_decreasing(lengths, capacity)
        cost = len(packing[2]) * capacity * (1 + capacity / ATTENTION_TOKENS)
        if best is None or cost < best[0]:
            best = (cost, capacity, packing)
        if len(packing[2]) == 1:
            break
    return best[1], best[2]


def _first_fit_decreasing(lengths: list[int], capacity: int) -> tuple[list[int], list[int], list[int]]:
    """Row and offset of each item, and the tokens used per row. Ties keep input order (stable sort)."""
    row_of, offset_of = [0] * len(lengths), [0] * len(lengths)
    used: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[item]
        row = next((row for row, filled in enumerate(used) if filled + size <= capacity), len(used))
        if row == len(used):
            used.append(0)
        row_of[item], offset_of[item] = row, used[row]
        used[row] += size
    return row_of, offset_of, used


def _pad_columns(mask: Tensor, width: int) -> Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.nn.functional.pad(mask, (0, missing), value=False)
