"""The PPO trainer: stage 4 (initial checkpoint) and stage 5 (the training loop, resumable).

Per update (docs/ARCHITECTURE.md): roll out a local batch, compute per-token rewards (−kl_coef·KL
with the score at the last real token), GAE advantages and returns, then `num_ppo_epochs` passes
over `num_mini_batches` shuffled mini-batches, each accumulated over its micro-batches and ended by
one optimizer step. Every update is a resumable boundary: a checkpoint holds everything the next
update reads (weights, optimizer, scheduler, RNG states), and the data order is a pure function
of the seed and the update index, so a resumed run repeats the uninterrupted one bit for bit.
With `ppo.eval_every`, some updates end with stage 6's evaluation of the policy on the eval prompts
(main process), which draws from no generator that training uses.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ppoflow import advantages as adv
from ppoflow import zero
from ppoflow.checkpoint import (
    capture_rng,
    check_sharding,
    load_training_state,
    newest_valid_checkpoint,
    prune_checkpoints,
    read_state,
    restore_rng,
    save_training_state,
    verify_checkpoint,
    write_checkpoint,
)
from ppoflow.data import load_prompts, local_batch
from ppoflow.errors import CheckpointError, TrainingDiverged
from ppoflow.evaluate import Evaluator
from ppoflow.forwards import response_logits, token_values
from ppoflow.losses import entropy_from_logits, logprobs_of, policy_loss, value_loss
from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, RunPlan, training_fingerprint
from ppoflow.models import load_frozen, load_policy, load_value
from ppoflow.reward_inputs import conversations
from ppoflow.rewards import Scores, load_reward_functions, score
from ppoflow.rollout import Rollout, build_worker, left_pad
from ppoflow.runtime import configure_torch, make_accelerator, sharding
from ppoflow.schedule import make_scheduler, warmup_steps
from ppoflow.sharding import (
    full_model_state,
    full_optimizer_state,
    full_value,
    gathered,
    held_parameters,
    load_full_optimizer_state,
    set_gradient_sync,
    shard,
    sharded_forwards,
)
from ppoflow.tokenizers import load_tokenizer
from ppoflow.workspace import METRICS_FILE

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, Any]], None]

# transformers' Trainer convention (`Trainer.get_decay_parameter_names`), which TRL's PPOTrainer
# inherits: no weight decay on biases and normalisation weights.
NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


class AtResponseTokens(nn.Module):
    """A model's outputs at a layout's `before` positions behind one `forward`, so that DDP, which
    syncs the gradients of what runs through its forward, can wrap it. The policy and the value model
    are wrapped apart and step through forward and backward one after the other: only one model's
    activations are alive at a time (their losses share no parameters, so the gradients are the same)."""

    def __init__(self, model: PreTrainedModel, read: Callable):
        super().__init__()
        self.model = model
        self.read = read

    def forward(self, input_ids, attention_mask, position_ids, before):
        output = self.read(
            self.model, {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}, before
        )
        # A view (the value head's squeezed output) would escape FSDP2's pre-backward hook if modified in place.
        return output.clone() if output._is_view() else output


def decay_parameter_groups(models: Sequence[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: `weight_decay` on weights, none on biases
    and normalisation weights (by name, or inside an `nn.LayerNorm`), as transformers' Trainer does."""
    decay, no_decay = [], []
    for model in models:
        in_layer_norm = {
            id(p) for module in model.modules() if isinstance(module, nn.LayerNorm) for p in module.parameters()
        }
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                exempt = id(parameter) in in_layer_norm or NO_DECAY.search(name.lower())
                (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PPOTrainer:
    """Owns the four models, the optimizer and the loop. Build it with `from_checkpoint`."""

    def __init__(
        self, plan: RunPlan, models: ModelManifest, data: DatasetManifest, accelerator: Accelerator | None = None
    ):
        self.plan, self.models, self.data = plan, models, data
        self.config = plan.config
        self.ppo = plan.config.ppo
        self.batch = plan.batch
        configure_torch(self.config.runtime)
        self.accelerator = accelerator or make_accelerator()
        if self.accelerator.num_processes != self.batch.world_size:
            raise CheckpointError(
                f"the run plan is for {self.batch.world_size} process(es) but {self.accelerator.num_processes} "
                "are running — re-run stage 1 with the same number of processes"
            )
        self.output_dir = plan.output_dir
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.tokenizer = load_tokenizer(models.tokenizer_dir)
        self.reward_functions = load_reward_functions(self.config.reward_functions)
        self.train_rows = load_prompts(data.train_dir)
        self.update = 0
        self.episode = 0
        self.optimizer_steps = 0

    # ----------------------------------------------------------------- building and checkpoints
    def _build(self, checkpoint: Path | None) -> None:
        """Load models (from the sources, or from a checkpoint) and the optimizer state."""
        device = self.accelerator.device
        policy = load_policy(self.config, self.models, checkpoint, trainable=True, device=device)
        value = load_value(self.config, self.models, checkpoint, device=device)
        ref, reward = load_frozen(self.config, self.models, device)
        plan = sharding(self.config.runtime)
        self.fsdp = plan.fsdp
        self.zero_stage = plan.zero_stage
        self.engine = None  # the DeepSpeed engine of both models under ZeRO
        # The sharded reference and reward model (`runtime.fsdp_frozen`), called through their wrappers'
        # forwards, where FSDP gathers each of their groups in turn; none: they are whole on every process.
        self.frozen_roots: list[nn.Module] = []
        if self.fsdp:
            # Every process loaded the full weights; each keeps its shards.
            self.policy_wrapper = shard(AtResponseTokens(policy, response_logits), layer_classes=plan.layer_classes)
            self.value_wrapper = shard(AtResponseTokens(value, token_values), layer_classes=plan.layer_classes)
            # One optimizer spans both models: its full state is keyed by names under this container.
            self.sharded = nn.ModuleDict({"policy": self.policy_wrapper, "value": self.value_wrapper})
            if plan.frozen:
                self.frozen_roots = [
                    shard(AtResponseTokens(model, read), frozen=True, layer_classes=plan.layer_classes)
                    for model, read in ((ref, response_logits), (reward, token_values))
                ]
            for name, root in zip(
                ("policy", "value", "reference", "reward"),
                (self.policy_wrapper, self.value_wrapper, *self.frozen_roots),
                strict=False,
            ):
                held, total = held_parameters(root)
                log.info(
                    "fsdp: %s: %d of its %d parameters held by process %d",
                    name,
                    held,
                    total,
                    self.accelerator.process_index,
                )
        elif self.zero_stage:  # both behind one forward, the engine's (`zero.PolicyAndValue`), made below
            self.policy_wrapper = AtResponseTokens(policy, response_logits)
            self.value_wrapper = AtResponseTokens(value, token_values)
        else:
            self.policy_wrapper = self.accelerator.prepare_model(AtResponseTokens(policy, response_logits))
            self.value_wrapper = self.accelerator.prepare_model(AtResponseTokens(value, token_values))
        # Not accelerate's unwrap_model: with deepspeed installed it imports deepspeed (seconds, and MLflow
        # with it) for any model.
        self.policy, self.value = (
            (wrapper.module if isinstance(wrapper, DistributedDataParallel) else wrapper).model
            for wrapper in (self.policy_wrapper, self.value_wrapper)
        )
        if self.ppo.gradient_checkpointing:
            # Non-reentrant: works with a frozen LoRA base too (no inputs that require grad needed).
            for model in (self.policy, self.value):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.policy.eval()
        self.value.eval()
        self.trainable = [p for model in (self.policy, self.value) for p in model.parameters() if p.requires_grad]
        # The fused kernel updates every parameter in one pass: on CPU 5x faster than the per-tensor
        # loop for a 26 M-parameter model (0.036 s vs 0.19 s a step with foreach), same arithmetic.
        self.optimizer = torch.optim.AdamW(
            decay_parameter_groups((self.policy, self.value), self.ppo.weight_decay),
            lr=self.ppo.learning_rate,
            eps=self.ppo.adam_epsilon,
            fused=device.type in ("cpu", "cuda"),
        )
        # Over optimizer steps, one per mini-batch (TRL steps its scheduler once per update).
        self.scheduler = make_scheduler(
            self.optimizer,
            self.ppo.lr_scheduler_type,
            warmup_steps=warmup_steps(self.ppo.warmup_ratio, self.batch.optimizer_steps),
            total_steps=self.batch.optimizer_steps,
        )
        if self.zero_stage:
            batch = self.batch
            self.engine = zero.initialize(
                zero.PolicyAndValue(self.policy_wrapper, self.value_wrapper),
                self.optimizer,
                zero.engine_config(
                    self.zero_stage,
                    micro_batch_size=batch.local_micro_batch_size,
                    accumulation=batch.micro_batches_per_mini_batch,
                    world_size=batch.world_size,
                    max_grad_norm=self.ppo.max_grad_norm,
                ),
            )
        # The packing self-check runs the models whole (on the main process alone for the evaluator's).
        with self._gathered(self.policy_wrapper, self.value_wrapper, *self.frozen_roots):
            self.worker = build_worker(
                self.config,
                self.models,
                self.policy,
                ref,
                reward,
                self.value,
                chunk_size=self.ppo.local_rollout_forward_batch_size,
                entry_points=self.frozen_roots,
            )
            # Stage 6's evaluation on the models in training (`ppo.eval_every`): the main process evaluates.
            self.evaluator = None
            if self.ppo.eval_every is not None and self.accelerator.is_main_process:
                eval_worker = build_worker(
                    self.config, self.models, self.policy, ref, reward, None, chunk_size=self.config.eval.batch_size
                )
                self.evaluator = Evaluator(
                    self.config, self.models, eval_worker, load_prompts(self.data.eval_dir), device
                )
        if checkpoint is not None:
            self._load_state(checkpoint)

    def _load_state(self, checkpoint: Path) -> None:
        state = read_state(checkpoint)
        if state["config_hash"] != self.plan.config_hash:
            raise CheckpointError(
                f"{checkpoint} belongs to config {state['config_hash']}, not {self.plan.config_hash} — "
                "use a fresh output_dir for a changed config"
            )
        check_sharding(checkpoint, state, self.fsdp, self.zero_stage)
        optimizer, scheduler, rng = load_training_state(checkpoint)
        if self.fsdp:
            load_full_optimizer_state(self.sharded, self.optimizer, optimizer)
        elif self.engine is not None:
            zero.load_optimizer_partitions(self.engine, optimizer)
        else:
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
        restore_rng(rng[self.accelerator.process_index])
        self.update, self.episode, self.optimizer_steps = state["update"], state["episode"], state["optimizer_steps"]

    @classmethod
    def from_checkpoint(
        cls, plan, models, data, checkpoint: Path | None, accelerator: Accelerator | None = None
    ) -> PPOTrainer:
        trainer = cls(plan, models, data, accelerator)
        if checkpoint is None:
            torch.manual_seed(plan.config.ppo.seed + trainer.accelerator.process_index)
        trainer._build(checkpoint)
        return trainer

    def save_checkpoint(self) -> CheckpointManifest:
        """All processes call this; the main process writes. Returns the checkpoint's manifest."""
        rng_states = gather_object([capture_rng()])
        if self.fsdp:  # every process gathers; the main one receives the full states
            policy_state = full_model_state(self.policy_wrapper, prefix="model.")
            value_state = full_model_state(self.value_wrapper, prefix="model.")
            optimizer_state = full_optimizer_state(self.sharded, self.optimizer)
        elif self.engine is not None:  # every process's partition, on the main one
            policy_state, value_state, optimizer_state = None, None, zero.optimizer_partitions(self.engine)
        else:
            policy_state, value_state, optimizer_state = None, None, self.optimizer.state_dict()
        path = None
        # ZeRO-3: the main process saves the parameters gathered whole.
        with zero.gathered(self.engine):
            if self.accelerator.is_main_process:
                path = self._write_checkpoint(rng_states, policy_state, value_state, optimizer_state)
            self.accelerator.wait_for_everyone()
        path = gather_object([path])[0] if self.accelerator.num_processes > 1 else path
        return CheckpointManifest(
            path=path,
            update=self.update,
            episode=self.episode,
            num_updates=self.batch.num_updates,
            sha256=verify_checkpoint(path),
        )

    def _write_checkpoint(self, rng_states, policy_state, value_state, optimizer_state) -> Path:
        """The main process's part of `save_checkpoint`: write the checkpoint, prune the old ones."""
        state = {
            "update": self.update,
            "episode": self.episode,
            "optimizer_steps": self.optimizer_steps,
            "num_updates": self.batch.num_updates,
            "config_hash": self.plan.config_hash,
            # stages 4 and 5 continue it only from these models and data; stage 3 archives it otherwise
            "training_fingerprint": training_fingerprint(self.models, self.data.fingerprint),
            "world_size": self.batch.world_size,
            "fsdp": self.fsdp,
            "zero_stage": self.zero_stage,
        }

        def payload(directory: Path) -> None:
            save_training_state(
                directory,
                policy=self.policy,
                value=self.value,
                optimizer_state=optimizer_state,
                scheduler=self.scheduler,
                rng_states=rng_states,
                policy_state=policy_state,
                value_state=value_state,
            )

        path = write_checkpoint(self.checkpoint_root, self.update, payload, state)
        prune_checkpoints(self.checkpoint_root, self.ppo.keep_checkpoints)
        return path

    @contextmanager
    def _gathered(self, *roots: nn.Module) -> Iterator[None]:
        """The sharded `roots` (FSDP) and, under ZeRO-3, both trained models, whole for the block,
        with no collective in their forwards. All processes enter and leave it together."""
        with gathered(*roots), zero.gathered(self.engine):
            yield

    # ----------------------------------------------------------------------------- the loop
    def _decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [
            self.tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
            for row, m in zip(responses, mask, strict=True)
        ]

    def train(self, callbacks: Sequence[MetricsCallback] = ()) -> CheckpointManifest:
        """Run the remaining updates; evaluate every `eval_every` and at the end (into that update's
        metrics); checkpoint every `checkpoint_every` and at the end."""
        metrics_path = self.output_dir / METRICS_FILE
        if self.accelerator.is_main_process:
            _truncate_metrics(metrics_path, self.update)
        manifest = None
        # Closed on the way out of an error or Ctrl-C too, so that what is said next starts on its own line.
        with tqdm(
            total=self.batch.num_updates,
            initial=self.update,
            desc="ppo",
            unit="update",
            disable=not self.accelerator.is_main_process,
        ) as progress:
            while self.update < self.batch.num_updates:
                metrics = self.step()
                if self._evaluation_due():
                    metrics |= self.evaluate()
                if self.accelerator.is_main_process:
                    with open(metrics_path, "a") as handle:
                        handle.write(json.dumps(metrics) + "\n")
                    for callback in callbacks:
                        callback(metrics)
                progress.update(1)
                progress.set_postfix(
                    {
                        "episodes/s": f"{metrics['perf/episodes_per_s']:.1f}",
                        "score": f"{metrics['objective/scores']:.3f}",
                        "kl": f"{metrics['objective/kl']:.3f}",
                    }
                )
                if self.update % self.ppo.checkpoint_every == 0 or self.update == self.batch.num_updates:
                    manifest = self.save_checkpoint()
        if manifest is None:
            found = newest_valid_checkpoint(self.checkpoint_root)
            path, digest = found
            manifest = CheckpointManifest(
                path=path, update=self.update, episode=self.episode, num_updates=self.batch.num_updates, sha256=digest
            )
        return manifest

    def _evaluation_due(self) -> bool:
        every = self.ppo.eval_every
        return every is not None and (self.update % every == 0 or self.update == self.batch.num_updates)

    def evaluate(self) -> dict[str, float]:
        """The current policy against the reference on the eval prompts, stage 6's numbers as `eval/<key>`
        (with `timing/eval`), computed by the main process while the others wait; empty on the others.
        The evaluator puts back every RNG state it touches, so training draws what it would without."""
        metrics: dict[str, float] = {}
        # All processes gather the sharded models; the main one evaluates.
        with self._gathered(self.policy_wrapper, *self.frozen_roots):
            if self.evaluator is not None:
                began = time.perf_counter()
                results, _ = self.evaluator()
                metrics = {f"eval/{key}": value for key, value in results.items()} | {
                    "timing/eval": time.perf_counter() - began
                }
            self.accelerator.wait_for_everyone()
        return metrics

    def step(self) -> dict[str, Any]:
        """One PPO update: rollout, score, KL, rewards, GAE, optimise. Returns the update's metrics."""
        began = time.perf_counter()
        ppo = self.ppo
        prompts = local_batch(self.train_rows, self.batch, self.update, ppo.seed, self.accelerator.process_index)
        queries, query_mask = left_pad(prompts["input_ids"], self.models.pad_token_id, self.accelerator.device)
        # Rollout: responses, their log-probs (policy, reference), values and reward-model scores; the
        # sharded policy and value whole meanwhile, so that processes may generate to different lengths;
        # sharded frozen models gather layer by layer in their forwards, the same forwards on every process.
        with self._gathered(self.policy_wrapper, self.value_wrapper), sharded_forwards(*self.frozen_roots):
            rollout = self.worker.rollout(queries, query_mask, messages=conversations(prompts))
        scoring_began = time.perf_counter()
        scores = score(
            rollout.rm_scores,
            rollout.complete,
            prompts["prompt"],
            self._decode(rollout.responses, rollout.response_mask),
            reward_functions=self.reward_functions,
            missing_eos_penalty=ppo.missing_eos_penalty,
        )
        rollout.timings["score"] += time.perf_counter() - scoring_began
        self._check_finite({"objective/scores": scores.total, "values": rollout.values})
        mask = rollout.response_mask
        kl = adv.kl_penalty(rollout.logprobs, rollout.ref_logprobs, ppo.kl_estimator).masked_fill(~mask, 0.0)
        rewards, non_score_reward = adv.per_token_rewards(scores.total, kl, mask, ppo.kl_coef)
        if ppo.whiten_rewards:
            rewards = adv.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = adv.gae(rewards, rollout.values, mask, ppo.gamma, ppo.lam)
        advantages = adv.masked_whiten(advantages, mask)

        train_began = time.perf_counter()
        stats = self._optimise(rollout, advantages, returns)
        timings = {**rollout.timings, "train": time.perf_counter() - train_began, "step": time.perf_counter() - began}

        self.update += 1
        self.episode += self.batch.batch_size
        metrics = self._metrics(rollout, scores, kl, non_score_reward, stats, timings)
        self._check_finite({name: torch.tensor(value) for name, value in metrics.items() if isinstance(value, float)})
        return metrics

    def _metrics(
        self,
        rollout: Rollout,
        scores: Scores,
        kl: torch.Tensor,
        non_score_reward: torch.Tensor,
        stats: dict[str, float],
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """The update's metrics, with TRL's names, averaged over processes (counts summed). Per-token
        statistics are over real response tokens only (docs/METRICS.md)."""
        reduce = self._mean_across_processes
        mask = rollout.response_mask
        response_tokens = self.accelerator.reduce(mask.sum().float(), "sum").item()
        eos_tokens = (rollout.responses == self.models.eos_token_id).logical_and(mask).sum().float()
        return {
            "update": self.update,
            "episode": self.episode,
            "objective/kl": reduce(kl.sum(1).mean()),
            "objective/entropy": reduce((-rollout.logprobs).sum(1).mean()),
            "objective/non_score_reward": reduce(non_score_reward.sum(1).mean()),
            "objective/rlhf_reward": reduce((scores.total + non_score_reward.sum(1)).mean()),
            "objective/scores": reduce(scores.total.mean()),
            "reward/model_score": reduce(rollout.rm_scores.mean()),
            **{f"reward/{name}": reduce(values.mean()) for name, values in scores.by_function.items()},
            **stats,
            "val/num_eos_tokens": self.accelerator.reduce(eos_tokens, "sum").item(),
            "response/length_mean": reduce(mask.sum(1).float().mean()),
            "response/stop_rate": reduce(rollout.complete.float().mean()),
            **{f"timing/{key}": value for key, value in timings.items()},
            "perf/tokens_per_s": response_tokens / timings["step"],
            "perf/episodes_per_s": self.batch.batch_size / timings["step"],
        }

    def _optimise(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        """`num_ppo_epochs` × `num_mini_batches` optimizer steps, each accumulating its micro-batches."""
        ppo, batch = self.ppo, self.batch
        micro_batches = batch.micro_batches_per_mini_batch
        records: dict[str, list[torch.Tensor]] = {
            key: [] for key in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "entropy", "ratio")
        }
        learning_rates: list[float] = []
        self.policy_wrapper.train()
        self.value_wrapper.train()
        for _epoch in range(ppo.num_ppo_epochs):
            order = torch.randperm(batch.local_batch_size)
            for mini in range(ppo.num_mini_batches):
                mini_rows = order[mini * batch.local_mini_batch_size : (mini + 1) * batch.local_mini_batch_size]
                for micro in range(micro_batches):
                    rows = mini_rows[micro * batch.local_micro_batch_size : (micro + 1) * batch.local_micro_batch_size]
                    record = self._accumulate(
                        rollout, advantages, returns, rows, micro_batches, sync=micro == micro_batches - 1
                    )
                    for key, value in record.items():
                        records[key].append(value)
                learning_rates.append(self.optimizer.param_groups[0]["lr"])
                self._optimizer_step()
        self.policy_wrapper.eval()
        self.value_wrapper.eval()
        ratios = torch.stack(records["ratio"])
        return {
            "policy/approxkl_avg": self._mean_across_processes(torch.stack(records["approxkl"]).mean()),
            "policy/clipfrac_avg": self._mean_across_processes(torch.stack(records["pg_clipfrac"]).mean()),
            "loss/policy_avg": self._mean_across_processes(torch.stack(records["pg_loss"]).mean()),
            "loss/value_avg": self._mean_across_processes(torch.stack(records["vf_loss"]).mean()),
            "val/clipfrac_avg": self._mean_across_processes(torch.stack(records["vf_clipfrac"]).mean()),
            "policy/entropy_avg": self._mean_across_processes(torch.stack(records["entropy"]).mean()),
            "val/ratio": self._mean_across_processes(ratios.mean()),
            "val/ratio_var": self._mean_across_processes(ratios.var(unbiased=False)),
            # The rate this update's optimizer steps used, their mean (TRL's rate is constant within an
            # update, since it steps its scheduler once per update).
            "lr": sum(learning_rates) / len(learning_rates),
        }

    def _accumulate(self, rollout: Rollout, advantages, returns, rows: torch.Tensor, micro_batches: int, *, sync: bool):
        """One micro-batch's gradients, added to the others'; synced across processes only on the
        mini-batch's last (`sync`)."""
        wrappers = [self.policy_wrapper, self.value_wrapper]
        if self.engine is not None:  # its hooks reduce the gradients; its step steps at the accumulation boundary
            record = self._micro_batch(rollout, advantages, returns, rows, micro_batches)
            self.engine.step()
            return record
        if self.fsdp:
            set_gradient_sync(wrappers, sync)
            return self._micro_batch(rollout, advantages, returns, rows, micro_batches)
        with ExitStack() as no_sync:
            if not sync:
                for wrapper in wrappers:
                    no_sync.enter_context(self.accelerator.no_sync(wrapper))
            return self._micro_batch(rollout, advantages, returns, rows, micro_batches)

    def _micro_batch(
        self, rollout: Rollout, advantages, returns, rows: torch.Tensor, micro_batches: int
    ) -> dict[str, torch.Tensor]:
        ppo = self.ppo
        mask = rollout.response_mask[rows]
        responses = rollout.responses[rows]
        layout = self.worker.layout(rollout.queries[rows], rollout.query_mask[rows], responses, mask)
        inputs = (layout.input_ids, layout.attention_mask, layout.position_ids, layout.before)
        if self.engine is not None:
            return self._engine_micro_batch(rollout, advantages, returns, rows, micro_batches, layout, inputs)
        with self.worker.autocast():  # the rollout's precision, so the first ratio is 1
            logits = self.policy_wrapper(*inputs).float()
        new_logprobs = layout.unflatten(logprobs_of(logits, responses[mask], ppo.temperature))
        pg_loss, pg_stats = policy_loss(new_logprobs, rollout.logprobs[rows], advantages[rows], mask, ppo.cliprange)
        self._check_finite({"loss/policy": pg_loss.detach()})
        # Policy and value go backward one after the other, not as one summed loss: they share no
        # parameters, so the gradients are the same, but only one model's activations are alive at a
        # time (the policy's are freed here, before the value forward), which lowers the peak memory.
        self.accelerator.backward(pg_loss / micro_batches)
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), ppo.temperature).mean()
        del logits, new_logprobs
        with self.worker.autocast():
            new_values = layout.unflatten(self.value_wrapper(*inputs).float())
        vf_loss, vf_stats = value_loss(new_values, rollout.values[rows], returns[rows], mask, ppo.cliprange_value)
        self._check_finite({"loss/value": vf_loss.detach()})
        self.accelerator.backward(ppo.vf_coef * vf_loss / micro_batches)
        return _micro_batch_record(pg_loss, vf_loss, pg_stats, vf_stats, entropy)

    def _engine_micro_batch(
        self, rollout: Rollout, advantages, returns, rows, micro_batches: int, layout, inputs
    ) -> dict[str, torch.Tensor]:
        """`_micro_batch` through the DeepSpeed engine: one forward of both models, one backward of
        their summed loss (the engine's hooks reduce and partition the gradients)."""
        ppo = self.ppo
        mask, responses = rollout.response_mask[rows], rollout.responses[rows]
        with self.worker.autocast():
            logits, values = self.engine(*inputs)
        logits = logits.float()
        new_logprobs = layout.unflatten(logprobs_of(logits, responses[mask], ppo.temperature))
        pg_loss, pg_stats = policy_loss(new_logprobs, rollout.logprobs[rows], advantages[rows], mask, ppo.cliprange)
        new_values = layout.unflatten(values.float())
        vf_loss, vf_stats = value_loss(new_values, rollout.values[rows], returns[rows], mask, ppo.cliprange_value)
        self._check_finite({"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach()})
        # Scaled here as on the other paths, not by the engine (scale_wrt_gas), so the gradients are the same numbers.
        self.engine.backward((pg_loss + ppo.vf_coef * vf_loss) / micro_batches, scale_wrt_gas=False)
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), ppo.temperature).mean()
        return _micro_batch_record(pg_loss, vf_loss, pg_stats, vf_stats, entropy)

    def _optimizer_step(self) -> None:
        if self.engine is not None:  # its step at the accumulation boundary clipped, stepped and zeroed
            if self.ppo.max_grad_norm is not None:
                self._check_finite({"grad_norm": zero.global_grad_norm(self.engine)})
            self.scheduler.step()
            self.optimizer_steps += 1
            return
        if self.ppo.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.ppo.max_grad_norm)
            self._check_finite({"grad_norm": full_value(grad_norm)})
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1

    def _mean_across_processes(self, value: torch.Tensor) -> float:
        return self.accelerator.reduce(value.detach().float().to(self.accelerator.device), "mean").item()

    def _check_finite(self, named: dict[str, torch.Tensor]) -> None:
        for name, value in named.items():
            if not torch.isfinite(value).all():
                raise TrainingDiverged(
                    f"update {self.update + 1}: `{name}` is not finite — lower ppo.learning_rate, check the reward "
                    f"model and reward functions; the last good checkpoint is kept in {self.checkpoint_root}"
                )


def _micro_batch_record(pg_loss, vf_loss, pg_stats: dict, vf_stats: dict, entropy) -> dict[str, torch.Tensor]:
    """What `_optimise` averages of each micro-batch."""
    return {
        "pg_loss": pg_loss.detach(),
        "vf_loss": vf_loss.detach(),
        "pg_clipfrac": pg_stats["clipfrac"],
        "vf_clipfrac": vf_stats["clipfrac"],
        "approxkl": pg_stats["approxkl"],
        "entropy": entropy,
        "ratio": pg_stats["ratio_mean"],
    }


def _truncate_metrics(path: Path, update: int) -> None:
    """Drop metric lines past the checkpoint we resume from (written before a crash)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["update"] <= update]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
