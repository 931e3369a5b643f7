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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ppoflow import advantages as adv
from ppoflow.backends import make_backend
from ppoflow.checkpoint import (
    capture_rng,
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
from ppoflow.losses import entropy_from_logits, logprobs_of, policy_loss, value_loss
from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, RunPlan, training_fingerprint
from ppoflow.models import load_frozen, load_policy, load_value
from ppoflow.reward_inputs import conversations
from ppoflow.rewards import Scores, load_reward_functions, score
from ppoflow.rollout import Rollout, build_worker, left_pad
from ppoflow.runtime import configure_torch, make_accelerator, sharding
from ppoflow.schedule import make_scheduler, warmup_steps
from ppoflow.tokenizers import load_tokenizer
from ppoflow.workspace import METRICS_FILE, check_resume

log = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, Any]], None]


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
        """Load models (from the sources, or from a checkpoint) into the run's backend, and the
        optimizer state."""
        device = self.accelerator.device
        policy = load_policy(self.config, self.models, checkpoint, trainable=True, device=device)
        value = load_value(self.config, self.models, checkpoint, device=device)
        ref, reward = load_frozen(self.config, self.models, device)
        self.backend = make_backend(sharding(self.config.runtime), self.accelerator, self.ppo, self.batch)
        # Over optimizer steps, one per mini-batch (TRL steps its scheduler once per update).
        self.backend.prepare(
            policy,
            value,
            ref,
            reward,
            schedule=lambda optimizer: make_scheduler(
                optimizer,
                self.ppo.lr_scheduler_type,
                warmup_steps=warmup_steps(self.ppo.warmup_ratio, self.batch.optimizer_steps),
                total_steps=self.batch.optimizer_steps,
            ),
        )
        self.policy, self.value = policy, value
        # The packing self-check runs the models whole (on the main process alone for the evaluator's).
        with self.backend.whole("policy", "value", "reference", "reward"):
            self.worker = build_worker(
                self.config,
                self.models,
                policy,
                ref,
                reward,
                value,
                chunk_size=self.ppo.local_rollout_forward_batch_size,
                entry_points=self.backend.frozen_roots,
            )
            # Stage 6's evaluation on the models in training (`ppo.eval_every`): the main process evaluates.
            self.evaluator = None
            if self.ppo.eval_every is not None and self.accelerator.is_main_process:
                eval_worker = build_worker(
                    self.config, self.models, policy, ref, reward, None, chunk_size=self.config.eval.batch_size
                )
                self.evaluator = Evaluator(
                    self.config, self.models, eval_worker, load_prompts(self.data.eval_dir), device
                )
        if checkpoint is not None:
            self._load_state(checkpoint)

    def _load_state(self, checkpoint: Path) -> None:
        state = read_state(checkpoint)
        check_resume(self.output_dir, state, config_hash=self.plan.config_hash, sharding=self.backend.sharding_state)
        optimizer, scheduler, rng = load_training_state(checkpoint)
        self.backend.load_state(optimizer, scheduler)
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
        path = None
        with self.backend.checkpoint_state() as (policy_state, value_state, optimizer_state):
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
            **self.backend.sharding_state,
        }

        def payload(directory: Path) -> None:
            save_training_state(
                directory,
                policy=self.policy,
                value=self.value,
                optimizer_state=optimizer_state,
                scheduler=self.backend.scheduler,
                rng_states=rng_states,
                policy_state=policy_state,
                value_state=value_state,
            )

        path = write_checkpoint(self.checkpoint_root, self.update, payload, state)
        prune_checkpoints(self.checkpoint_root, self.ppo.keep_checkpoints)
        return path

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
        with self.backend.whole("policy", "reference", "reward"):
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
        with self.backend.whole("policy", "value"), self.backend.frozen_forwards():
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
        ppo, batch, backend = self.ppo, self.batch, self.backend
        micro_batches = batch.micro_batches_per_mini_batch
        records: dict[str, list[torch.Tensor]] = {
            key: [] for key in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "entropy", "ratio")
        }
        learning_rates: list[float] = []
        backend.train_mode(True)
        for _epoch in range(ppo.num_ppo_epochs):
            order = torch.randperm(batch.local_batch_size)
            for mini in range(ppo.num_mini_batches):
                mini_rows = order[mini * batch.local_mini_batch_size : (mini + 1) * batch.local_mini_batch_size]
                for micro in range(micro_batches):
                    rows = mini_rows[micro * batch.local_micro_batch_size : (micro + 1) * batch.local_micro_batch_size]
                    # Gradients synced across processes on the mini-batch's last micro-batch only.
                    record = self._micro_batch(rollout, advantages, returns, rows, sync=micro == micro_batches - 1)
                    for key, value in record.items():
                        records[key].append(value)
                learning_rates.append(backend.optimizer.param_groups[0]["lr"])
                if ppo.max_grad_norm is not None:
                    self._check_finite({"grad_norm": backend.clip_gradients()})
                backend.step()
                self.optimizer_steps += 1
        backend.train_mode(False)
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

    def _micro_batch(self, rollout: Rollout, advantages, returns, rows: torch.Tensor, *, sync: bool):
        """One micro-batch's losses, their gradients added to the mini-batch's (`Backend.micro_batch`)."""
        ppo = self.ppo
        micro_batches = self.batch.micro_batches_per_mini_batch
        mask, responses = rollout.response_mask[rows], rollout.responses[rows]
        layout = self.worker.layout(rollout.queries[rows], rollout.query_mask[rows], responses, mask)
        inputs = (layout.input_ids, layout.attention_mask, layout.position_ids, layout.before)
        with self.backend.micro_batch(sync) as models:
            with self.worker.autocast():  # the rollout's precision, so the first ratio is 1
                logits = models.policy(*inputs).float()
            new_logprobs = layout.unflatten(logprobs_of(logits, responses[mask], ppo.temperature))
            pg_loss, pg_stats = policy_loss(new_logprobs, rollout.logprobs[rows], advantages[rows], mask, ppo.cliprange)
            self._check_finite({"loss/policy": pg_loss.detach()})
            # Policy and value go backward one after the other, not as one summed loss: they share no
            # parameters, so the gradients are the same, but only one model's activations are alive at a
            # time (the policy's are freed here, before the value forward), which lowers the peak memory.
            # ZeRO's micro-batch holds this loss and backpropagates both, summed, at its end (one engine pass).
            models.backward(pg_loss / micro_batches)
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach(), ppo.temperature).mean()
            del logits, new_logprobs
            with self.worker.autocast():
                new_values = layout.unflatten(models.value(*inputs).float())
            vf_loss, vf_stats = value_loss(new_values, rollout.values[rows], returns[rows], mask, ppo.cliprange_value)
            self._check_finite({"loss/value": vf_loss.detach()})
            models.backward(ppo.vf_coef * vf_loss / micro_batches)
        return {
            "pg_loss": pg_loss.detach(),
            "vf_loss": vf_loss.detach(),
            "pg_clipfrac": pg_stats["clipfrac"],
            "vf_clipfrac": vf_stats["clipfrac"],
            "approxkl": pg_stats["approxkl"],
            "entropy": entropy,
            "ratio": pg_stats["ratio_mean"],
        }

    def _mean_across_processes(self, value: torch.Tensor) -> float:
        return self.accelerator.reduce(value.detach().float().to(self.accelerator.device), "mean").item()

    def _check_finite(self, named: dict[str, torch.Tensor]) -> None:
        for name, value in named.items():
            if not torch.isfinite(value).all():
                raise TrainingDiverged(
                    f"update {self.update + 1}: `{name}` is not finite — lower ppo.learning_rate, check the reward "
                    f"model and reward functions; the last good checkpoint is kept in {self.checkpoint_root}"
                )


def _truncate_metrics(path: Path, update: int) -> None:
    """Drop metric lines past the checkpoint we resume from (written before a crash)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["update"] <= update]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
