"""Small plain-torch training loops for the toy policy (SFT) and reward model (Bradley–Terry).

Sequences are lists of token ids that already start with BOS; batches are right-padded with the
pad id, which is also how the reward model is meant to be called: Hugging Face sequence
classifiers score the last non-pad token, i.e. EOS for a finished completion or the last word of a
truncated one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

IGNORE_INDEX = -100
WARMUP_FRACTION = 0.05
BUCKET_BATCHES = 16
LOSS_WINDOW = 20
MAX_GRAD_NORM = 1.0

TokenIds = Sequence[int]


def train_sft(
    model: PreTrainedModel,
    examples: Sequence[tuple[TokenIds, TokenIds]],
    *,
    pad_id: int,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> float:
    """Fine-tune a causal LM on (prompt ids, completion ids) pairs, with loss on completion tokens.

    The completion ids end with EOS, so the model learns to stop. Returns the mean loss of the last
    `LOSS_WINDOW` steps.
    """
    lengths = [len(prompt) + len(completion) for prompt, completion in examples]
    optimizer, scheduler = warmup_cosine_adamw(model, lr, math.ceil(len(examples) / batch_size) * epochs)
    model.train()
    losses = []
    for batch in length_bucketed_batches(lengths, batch_size, epochs, generator):
        pairs = [examples[index] for index in batch]
        input_ids = pad_right([[*prompt, *completion] for prompt, completion in pairs], pad_id)
        labels = pad_right([[IGNORE_INDEX] * len(prompt) + [*completion] for prompt, completion in pairs], IGNORE_INDEX)
        loss = model(input_ids=input_ids, attention_mask=input_ids != pad_id, labels=labels).loss
        losses.append(clipped_step(model, loss, optimizer, scheduler))
    model.eval()
    return recent_mean(losses)


def train_reward(
    model: PreTrainedModel,
    pairs: Sequence[tuple[TokenIds, TokenIds]],
    *,
    pad_id: int,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> float:
    """Train a one-label sequence classifier on (chosen ids, rejected ids) pairs.

    Bradley–Terry loss, -log sigmoid(r_chosen - r_rejected); a batch's chosen and rejected
    sequences go through the model together. Returns the mean loss of the last `LOSS_WINDOW` steps.
    """
    lengths = [max(len(chosen), len(rejected)) for chosen, rejected in pairs]
    optimizer, scheduler = warmup_cosine_adamw(model, lr, math.ceil(len(pairs) / batch_size) * epochs)
    model.train()
    losses = []
    for batch in length_bucketed_batches(lengths, batch_size, epochs, generator):
        chosen = [pairs[index][0] for index in batch]
        rejected = [pairs[index][1] for index in batch]
        input_ids = pad_right(chosen + rejected, pad_id)
        rewards = model(input_ids=input_ids, attention_mask=input_ids != pad_id).logits[:, 0]
        r_chosen, r_rejected = rewards[: len(batch)], rewards[len(batch) :]
        loss = -F.logsigmoid(r_chosen - r_rejected).mean()
        losses.append(clipped_step(model, loss, optimizer, scheduler))
    model.eval()
    return recent_mean(losses)


def reward_scores(
    model: PreTrainedModel,
    sequences: Sequence[TokenIds],
    *,
    pad_id: int,
    batch_size: int = 64,
    read: Callable[[PreTrainedModel, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`[N]` reward-model scores of right-padded sequences, at each one's last non-pad token.

    Batches are formed in length order (scores come back in input order) to keep padding small.
    """
    by_length = sorted(range(len(sequences)), key=lambda index: len(sequences[index]))
    scores = torch.empty(len(sequences))
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = by_length[start : start + batch_size]
            input_ids = pad_right([sequences[index] for index in batch], pad_id)
            if read is None:
                scores[batch] = model(input_ids=input_ids, attention_mask=input_ids != pad_id).logits[:, 0]
            else:
                scores[batch] = read(model, input_ids, torch.tensor([len(sequences[index]) for index in batch]))
    return scores


def pairwise_accuracy(model: PreTrainedModel, pairs: Sequence[tuple[TokenIds, TokenIds]], *, pad_id: int) -> float:
    """Fraction of (chosen, rejected) pairs the reward model orders correctly (ties count as wrong)."""
    chosen, rejected = zip(*pairs, strict=True)
    margin = reward_scores(model, chosen, pad_id=pad_id) - reward_scores(model, rejected, pad_id=pad_id)
    return (margin > 0).float().mean().item()


def pairwise_agreement(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Among pairs whose `truth` differs, the fraction that `scores` orders the same way. `[N]`, `[N]`."""
    truth_order = torch.sign(truth[:, None] - truth[None, :])
    score_order = torch.sign(scores[:, None] - scores[None, :])
    compared = truth_order != 0
    return (truth_order[compared] == score_order[compared]).float().mean().item()


def pad_right(sequences: Sequence[TokenIds], pad_value: int) -> torch.Tensor:
    """`[B, T]` tensor of the sequences padded on the right to the longest one."""
    width = max(len(sequence) for sequence in sequences)
    return torch.tensor([[*sequence] + [pad_value] * (width - len(sequence)) for sequence in sequences])


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, epochs: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """Index batches over `epochs` shuffled passes, grouped by similar length.

    Padding is wasted compute, so each window of `BUCKET_BATCHES` batches is sorted by length
    before it is cut into batches; the batches are then shuffled again so lengths do not trend.
    """
    window = batch_size * BUCKET_BATCHES
    for _ in range(epochs):
        order = torch.randperm(len(lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), window):
            bucket = sorted(order[start : start + window], key=lambda index: lengths[index])
            batches += [bucket[offset : offset + batch_size] for offset in range(0, len(bucket), batch_size)]
        for batch_index in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[batch_index]


def warmup_cosine_adamw(model: torch.nn.Module, lr: float, total_steps: int):
    """AdamW with linear warmup, then cosine decay to 10% of `lr` by `total_steps`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clipped_step(model: torch.nn.Module, loss: torch.Tensor, optimizer, scheduler) -> float:
    """One clipped optimizer step on `loss`; returns the loss value."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def recent_mean(losses: list[float]) -> float:
    recent = losses[-LOSS_WINDOW:]
    return sum(recent) / len(recent)
