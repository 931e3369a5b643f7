"""Rollouts: sample responses, then score them and compute the log-probs and values PPO needs.

Shapes: B prompts, Q query width (left-padded), T response width (right-padded after the stop).
With a stop token (TRL's `stop_token: eos` or `stop_token_id`), a response ends at (and includes)
its first one and is padded after it; without one, every response runs to `response_length`.
Response ends are found from the stop tokens, never from padding, so a tokenizer whose pad token
is EOS still works.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from ppoflow.config import RunConfig
from ppoflow.forwards import has_logit_transform, response_logits, token_values, use_packing
from ppoflow.losses import holds_token, logprobs_of, response_mask
from ppoflow.manifests import ModelManifest
from ppoflow.models import resolve_dtype
from ppoflow.packing import Layout, make_layout
from ppoflow.reward_inputs import Messages, RewardTextEncoder
from ppoflow.tokenizers import load_tokenizer


@dataclass
class Rollout:
    """One local batch of experience. Tensors are on the training device."""

    queries: torch.Tensor  # [B, Q] left-padded prompt ids
    query_mask: torch.Tensor  # [B, Q] bool
    responses: torch.Tensor  # [B, T] response ids, pad after the end
    response_mask: torch.Tensor  # [B, T] bool, True up to and including the stop token
    logprobs: torch.Tensor  # [B, T] policy log-probs of the response tokens (0 on padding)
    ref_logprobs: torch.Tensor  # [B, T]
    values: torch.Tensor  # [B, T] value of the state before each response token (0 on padding)
    rm_scores: torch.Tensor  # [B] reward-model score (the total is `rewards.score`'s)
    complete: torch.Tensor  # [B] bool: holds the completion token (see ModelManifest.completion_token_id)
    timings: dict[str, float] = field(default_factory=dict)


def left_pad(sequences: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one width: ([B, Q] ids, [B, Q] bool mask)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = True
    return ids.to(device), mask.to(device)


class RolloutWorker:
    """Generates and evaluates responses for the policy against the frozen models."""

    def __init__(
        self,
        policy: PreTrainedModel,
        ref: PreTrainedModel | None,
        reward: PreTrainedModel,
        value: PreTrainedModel | None,
        *,
        pad_token_id: int,
        stop_token_ids: list[int],
        completion_token_id: int,
        response_length: int,
        temperature: float,
        top_k: int,
        top_p: float,
        chunk_size: int,
        packed: bool = False,
        reward_encoder: RewardTextEncoder | None = None,
        reward_packed: bool = False,
        compute_dtype: torch.dtype = torch.float32,
        entry_points: Sequence[nn.Module] = (),
    ):
        """`reward_encoder`: the reward model has its own tokenizer, and scores re-encoded text
        (laid out packed when `reward_packed`); None: it scores the policy's tokens in their layout.
        `entry_points`: wrappers (`backends.AtResponseTokens`, `.model` the model, forward
        `(input_ids, attention_mask, position_ids, before)`) through which the log-prob and score
        forwards of their models go: a sharded model gathers its groups in its wrapper's forward."""
        self.policy, self.ref, self.reward, self.value = policy, ref, reward, value
        self.entry_points = {id(entry.model): entry for entry in entry_points}
        self.reward_encoder = reward_encoder
        self.reward_packed = reward_packed
        self.compute_dtype = compute_dtype
        self.pad_token_id = pad_token_id
        self.stop_token_ids = stop_token_ids
        self.completion_token_id = completion_token_id
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.packed = packed
        # The log-probs of the sampled tokens can be read off generation itself (no policy forward) when
        # they are the same numbers a fresh forward gives: fp32 (a KV-cached bf16 forward drifts ~1e-2 from
        # a full one, enough to move PPO's first ratio off 1), no top-k/top-p (PPO's log-probs are of the
        # unfiltered distribution) and logits that are the LM head's output as is.
        self.reuse_logprobs = (
            compute_dtype == torch.float32 and not top_k and top_p >= 1.0 and not has_logit_transform(policy)
        )
        self.generation_config = GenerationConfig(
            max_new_tokens=response_length,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            # A list, even empty: None would be filled in from the model's own generation config (its EOS).
            eos_token_id=list(stop_token_ids),
            pad_token_id=pad_token_id,
        )

    def autocast(self):
        """The precision every forward runs in: bf16 (or fp16) compute over fp32 trainable weights
        through autocast, so rollout and training log-probs come from the same precision; fp32 as is."""
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=next(self.policy.parameters()).device.type, dtype=self.compute_dtype)

    def reference(self):
        """The reference model and the context to run it in (the policy with its LoRA adapter off)."""
        if self.ref is not None:
            return self.ref, nullcontext()
        return self.policy, self.policy.disable_adapter()

    @torch.no_grad()
    def generate(
        self,
        queries: torch.Tensor,
        query_mask: torch.Tensor,
        model: PreTrainedModel | None = None,
        *,
        record_logprobs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sample responses from `model` (default: the policy): [B, T] ids (pad after the stop), [B, T]
        bool mask, and with `record_logprobs` the [B, T] log-probs of the sampled tokens at the sampling
        temperature (0 on padding; None if generation did not run one forward per token)."""
        model = model or self.policy
        recorder = SampledLogprobs(model, self.temperature) if record_logprobs else None
        try:
            # Never in lockstep with the other processes: transformers would for a sharded model, and the
            # trainer generates from whole (`sharding.gathered`) parameters, on the main process alone to evaluate.
            sequences = model.generate(
                input_ids=queries,
                attention_mask=query_mask.long(),
                generation_config=self.generation_config,
                synced_gpus=False,
            )
        finally:
            if recorder is not None:
                recorder.remove()
        responses = sequences[:, queries.shape[1] :]
        mask = response_mask(responses, torch.tensor(self.stop_token_ids, dtype=torch.long))
        logprobs = recorder.result(responses) if recorder is not None else None
        if logprobs is not None:
            logprobs = logprobs.masked_fill(~mask, 0.0)
        return responses.masked_fill(~mask, self.pad_token_id), mask, logprobs

    def completed(self, responses: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """[B] bool: the response holds the completion token within its real tokens."""
        return holds_token(responses, response_mask, self.completion_token_id)

    def layout(self, queries, query_mask, responses, response_mask) -> Layout:
        """The decoder layout of prompt+response forwards: packed when the models support it."""
        return make_layout(
            queries,
            query_mask,
            responses,
            response_mask,
            packed=self.packed,
            pad_token_id=self.pad_token_id,
        )

    def logprobs(self, model: nn.Module, layout: Layout, responses: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of the response tokens under `model` at the sampling temperature (0 on padding)."""
        logits = self._read(model, response_logits, layout.decoder_inputs(), layout.before).float()
        return layout.unflatten(logprobs_of(logits, responses[layout.response_mask], self.temperature))

    def end_scores(
        self, layout: Layout, queries, query_mask, responses, response_mask, messages: list[Messages | None] | None
    ) -> torch.Tensor:
        """[B] reward-model score at each sequence's last real token: in the policy's `layout`, or,
        for a reward model with its own tokenizer, of the re-encoded sequences (`messages`: each
        prompt's conversation, None for a text prompt)."""
        if self.reward_encoder is None:
            return self._read(self.reward, token_values, layout.decoder_inputs(), layout.last).float()
        complete = self.completed(responses, response_mask).tolist()
        messages = messages or [None] * len(responses)
        sequences = [
            self.reward_encoder.encode(q[qm].tolist(), r[rm].tolist(), conversation, done)
            for q, qm, r, rm, conversation, done in zip(
                queries, query_mask, responses, response_mask, messages, complete, strict=True
            )
        ]
        pad = self.reward_encoder.reward_tokenizer.pad_token_id
        ids, mask = left_pad(sequences, pad, queries.device)
        no_response = torch.zeros((len(sequences), 1), dtype=torch.bool, device=queries.device)
        reward_layout = make_layout(
            ids, mask, no_response.long(), no_response, packed=self.reward_packed, pad_token_id=pad
        )
        return self._read(self.reward, token_values, reward_layout.decoder_inputs(), reward_layout.last).float()

    def _read(
        self, model: nn.Module, read: Callable, inputs: dict[str, torch.Tensor | None], index: torch.Tensor
    ) -> torch.Tensor:
        """`read(model, inputs, index)`, through the model's entry point when it has one."""
        entry = self.entry_points.get(id(model))
        return read(model, inputs, index) if entry is None else entry(**inputs, before=index)

    @torch.no_grad()
    def evaluate(
        self,
        queries,
        query_mask,
        responses,
        response_mask,
        logprobs: torch.Tensor | None = None,
        messages: list[Messages | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Log-probs (policy, unless given; reference), values and reward-model scores for given responses."""
        layout = self.layout(queries, query_mask, responses, response_mask)
        timings = {}
        start = time.perf_counter()
        if logprobs is None:
            logprobs = self.logprobs(self.policy, layout, responses)
        timings["policy"] = time.perf_counter() - start
        start = time.perf_counter()
        ref_model, adapter_off = self.reference()
        with adapter_off:
            ref_logprobs = self.logprobs(ref_model, layout, responses)
        timings["ref"] = time.perf_counter() - start
        start = time.perf_counter()
        values = layout.unflatten(token_values(self.value, layout.decoder_inputs(), layout.before).float())
        timings["value"] = time.perf_counter() - start
        start = time.perf_counter()
        rm_scores = self.end_scores(layout, queries, query_mask, responses, response_mask, messages)
        timings["score"] = time.perf_counter() - start
        return {
            "logprobs": logprobs,
            "ref_logprobs": ref_logprobs,
            "values": values,
            "rm_scores": rm_scores,
            "timings": timings,
        }

    def rollout(
        self, queries: torch.Tensor, query_mask: torch.Tensor, messages: list[Messages | None] | None = None
    ) -> Rollout:
        """Generate a local batch and evaluate it (log-probs, values, reward-model scores) in chunks of
        `chunk_size` prompts (`messages`: each prompt's conversation, or None, for a reward model that
        re-renders it)."""
        with self.autocast():
            return self._rollout(queries, query_mask, messages)

    def _rollout(self, queries, query_mask, messages) -> Rollout:
        timings = {"rollout": 0.0, "policy": 0.0, "ref": 0.0, "value": 0.0, "score": 0.0}
        pieces: list[dict] = []
        for start in range(0, queries.shape[0], self.chunk_size):
            chunk_q, chunk_m = queries[start : start + self.chunk_size], query_mask[start : start + self.chunk_size]
            began = time.perf_counter()
            responses, response_mask, logprobs = self.generate(chunk_q, chunk_m, record_logprobs=self.reuse_logprobs)
            timings["rollout"] += time.perf_counter() - began
            chunk_messages = messages[start : start + self.chunk_size] if messages is not None else None
            evaluated = self.evaluate(chunk_q, chunk_m, responses, response_mask, logprobs, chunk_messages)
            for key, seconds in evaluated.pop("timings").items():
                timings[key] += seconds
            pieces.append({"responses": responses, "response_mask": response_mask, **evaluated})
        width = max(piece["responses"].shape[1] for piece in pieces)
        responses = torch.cat([_pad_right(p["responses"], width, self.pad_token_id) for p in pieces])
        response_mask = torch.cat([_pad_right(p["response_mask"], width, False) for p in pieces])
        logprobs, ref_logprobs, values = (
            torch.cat([_pad_right(p[key], width, 0.0) for p in pieces])
            for key in ("logprobs", "ref_logprobs", "values")
        )
        rm_scores = torch.cat([p["rm_scores"] for p in pieces])
        complete = self.completed(responses, response_mask)
        return Rollout(
            queries=queries,
            query_mask=query_mask,
            responses=responses,
            response_mask=response_mask,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            rm_scores=rm_scores,
            complete=complete,
            timings=timings,
        )


def build_worker(
    config: RunConfig,
    models: ModelManifest,
    policy: PreTrainedModel,
    ref: PreTrainedModel | None,
    reward: PreTrainedModel,
    value: PreTrainedModel | None,
    *,
    chunk_size: int,
    entry_points: Sequence[nn.Module] = (),
) -> RolloutWorker:
    """The rollout worker of a run, the same for training and evaluation (which needs no value model):
    the run's stop rule and sampling, packing where every model honours it, and the reward model's
    own tokenizer when it has one (its packing then decided apart, with its own pad token)."""
    ppo = config.ppo
    reward_tokenizer = load_tokenizer(models.reward_tokenizer_dir) if models.reward_tokenizer_dir else None
    policy_side = {"policy": policy, "ref": ref, "value": value} | (
        {"reward": reward} if reward_tokenizer is None else {}
    )
    return RolloutWorker(
        policy,
        ref,
        reward,
        value,
        pad_token_id=models.pad_token_id,
        stop_token_ids=models.stop_token_ids,
        completion_token_id=models.completion_token_id,
        response_length=ppo.response_length,
        temperature=ppo.temperature,
        top_k=ppo.top_k,
        top_p=ppo.top_p,
        chunk_size=chunk_size,
        packed=use_packing(ppo.pack_sequences, policy_side, models.pad_token_id),
        reward_encoder=None
        if reward_tokenizer is None
        else RewardTextEncoder(load_tokenizer(models.tokenizer_dir), reward_tokenizer),
        reward_packed=reward_tokenizer is not None
        and use_packing(ppo.pack_sequences, {"reward": reward}, reward_tokenizer.pad_token_id),
        compute_dtype=resolve_dtype(config.models.dtype),
        entry_points=entry_points,
    )


class SampledLogprobs:
    """Records, while `generate` runs, the log-probability of each sampled token under
    softmax(raw logits / temperature): a hook on the LM head keeps the last position's log-softmax of each
    forward, and a pre-hook on the input embedding reads the token that was sampled from it when it comes
    back as the next forward's input (the last token is read from the output). One [B, V] row is held at a
    time, where `output_logits=True` would keep every step's logits. Hooks, not a logits processor:
    processors see logits after generation's own warpers."""

    def __init__(self, model: nn.Module, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self.handles = [
            model.get_input_embeddings().register_forward_pre_hook(self._on_input),
            model.get_output_embeddings().register_forward_hook(self._on_logits),
        ]

    def _on_input(self, module, args) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, args[0][:, -1:]).squeeze(1))
            self.pending = None

    def _on_logits(self, module, args, output) -> None:
        self.pending = torch.log_softmax(output[:, -1].float() / self.temperature, dim=-1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def result(self, responses: torch.Tensor) -> torch.Tensor | None:
        """[B, T] log-probs of `responses` (as generated, before padding), or None if the forwards did not
        line up one per generated token."""
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, responses[:, -1:]).squeeze(1))
            self.pending = None
        if len(self.steps) != responses.shape[1]:
            return None
        return torch.stack(self.steps, dim=1)


def _pad_right(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, missing), value=value)
