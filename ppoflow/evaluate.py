"""Stage 6: save the trained policy and compare it with the reference on the held-out prompts.

Both models sample from the same eval prompts with the same seed and sampling settings as in
training. Reported: mean reward-model score of each (`reward_policy`, `reward_ref`), the policy's
win rate against the reference (ties count half), the mean per-sequence KL(policy‖ref) on the
policy's samples, the policy's EOS rate, and each reward function's mean on both
(`<name>_policy`, `<name>_ref`). The trainer computes the same numbers on its own models every
`ppo.eval_every` updates (`Evaluator`), logged as `eval/<key>`.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from ppoflow.atomic import write_directory
from ppoflow.checkpoint import capture_rng, restore_rng
from ppoflow.config import RunConfig
from ppoflow.data import load_prompts
from ppoflow.manifests import ModelManifest
from ppoflow.models import load_frozen
from ppoflow.reward_inputs import conversations
from ppoflow.rewards import load_reward_functions
from ppoflow.rollout import RolloutWorker, build_worker, left_pad
from ppoflow.tokenizers import load_tokenizer
from ppoflow.workspace import EVAL_FILE, SAMPLES_FILE


def save_policy(
    config: RunConfig, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, models: ModelManifest, out_dir: Path
) -> Path | None:
    """Write `out_dir` (HF format with tokenizer and generation config) atomically; with LoRA the
    adapter, plus `out_dir`-merged when asked. Returns the merged directory, if any."""
    # The stop rule training used: the stop token, or none at all (an empty list, which generate()
    # does not replace with the model's EOS).
    generation = GenerationConfig(
        eos_token_id=models.stop_token_ids,
        pad_token_id=models.pad_token_id,
        do_sample=True,
        temperature=config.ppo.temperature,
        max_new_tokens=config.ppo.response_length,
    )

    def write(target: Path, model: PreTrainedModel) -> None:
        def save(staging: Path) -> None:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            generation.save_pretrained(staging)

        write_directory(target, save)

    write(out_dir, policy)
    if config.peft.enabled and config.peft.merge_on_save:
        merged_dir = out_dir.with_name(out_dir.name + "-merged")
        write(merged_dir, policy.merge_and_unload())
        return merged_dir
    return None


def evaluate_policy(
    config: RunConfig,
    models: ModelManifest,
    eval_dir: Path,
    policy: PreTrainedModel,
    device: torch.device,
    baseline: PreTrainedModel | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Eval metrics and the sample-completions rows (prompt, both completions, their scores) of a
    loaded policy, with the run's frozen reference and reward model loaded for it. `baseline`:
    another policy sampled in the reference's place (the promotion gate's head-to-head against the
    alias holder): the `*_ref` numbers and the win rate are then against it; KL stays against the
    reference."""
    rows = load_prompts(eval_dir)
    if len(rows) == 0:  # data.eval_size 0: nothing held out, nothing to load; the count alone, no means of nothing
        return {"num_prompts": 0.0}, []
    ref, reward = load_frozen(config, models, device)
    policy = policy.eval().to(device)
    worker = build_worker(config, models, policy, ref, reward, None, chunk_size=config.eval.batch_size)
    return Evaluator(config, models, worker, rows, device, progress=True)(baseline)


class Evaluator:
    """The policy of a rollout worker against its reference on the eval prompts, as often as asked:
    stage 6 and the promotion gate build one on models they load, the trainer one on its own models
    (`ppo.eval_every`). Every call samples with the seeds of `eval.seed` and puts back every random
    number generator state it touched, so it changes nothing that training draws."""

    def __init__(
        self,
        config: RunConfig,
        models: ModelManifest,
        worker: RolloutWorker,
        rows: Dataset,
        device: torch.device,
        progress: bool = False,
    ):
        self.config, self.worker, self.rows, self.device = config, worker, rows, device
        self.progress = (
            progress  # a bar over the prompts when they take several batches (stage 6; not under training's bar)
        )
        self.pad_token_id = models.pad_token_id
        self.tokenizer = load_tokenizer(models.tokenizer_dir)
        self.functions = load_reward_functions(config.reward_functions)

    @torch.no_grad()
    def __call__(self, baseline: PreTrainedModel | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Eval metrics and the sample-completions rows (see `evaluate_policy`)."""
        saved_rng = capture_rng()
        try:
            results, function_values = self._sample_and_score(baseline)
        finally:
            restore_rng(saved_rng)
        count = len(results["prompt"])
        wins = sum(
            1.0 if p > r else 0.5 if p == r else 0.0
            for p, r in zip(results["score_policy"], results["score_ref"], strict=True)
        )
        metrics = {
            "reward_policy": sum(results["score_policy"]) / count,
            "reward_ref": sum(results["score_ref"]) / count,
            "win_rate": wins / count,
            "kl": sum(results["kl"]) / count,
            "eos_rate": sum(results["stop"]) / count,
            "num_prompts": float(count),
            **{name: sum(values) / count for name, values in function_values.items()},
        }
        table = [
            {
                "prompt": results["prompt"][i],
                "ref_completion": results["ref"][i],
                "policy_completion": results["policy"][i],
                "ref_score": results["score_ref"][i],
                "policy_score": results["score_policy"][i],
            }
            for i in range(min(self.config.eval.sample_table_size, count))
        ]
        return metrics, table

    def _sample_and_score(self, baseline: PreTrainedModel | None) -> tuple[dict[str, list], dict[str, list[float]]]:
        config, worker, policy, rows, tokenizer = (
            self.config,
            self.worker,
            self.worker.policy,
            self.rows,
            self.tokenizer,
        )
        results: dict[str, list] = {
            key: [] for key in ("prompt", "policy", "ref", "score_policy", "score_ref", "kl", "stop")
        }
        function_values: dict[str, list[float]] = {
            f"{fn.metric_name}_{who}": [] for fn in self.functions for who in ("policy", "ref")
        }
        bar = tqdm(
            total=len(rows),
            desc="eval",
            unit="prompt",
            disable=not self.progress or len(rows) <= config.eval.batch_size,
        )
        with worker.autocast(), bar:  # the precision training used
            for start in range(0, len(rows), config.eval.batch_size):
                chunk = rows.select(range(start, min(start + config.eval.batch_size, len(rows))))
                queries, query_mask = left_pad(chunk["input_ids"], self.pad_token_id, self.device)
                completions = {}
                for who in ("policy", "ref"):
                    torch.manual_seed(config.eval.seed + start)
                    if who == "policy" or baseline is not None:
                        model, context = (policy if who == "policy" else baseline), nullcontext()
                    else:
                        model, context = worker.reference()
                    with context:
                        responses, mask, _ = worker.generate(queries, query_mask, model)
                    layout = worker.layout(queries, query_mask, responses, mask)
                    scores = worker.end_scores(layout, queries, query_mask, responses, mask, conversations(chunk))
                    results[f"score_{who}"].extend(scores.tolist())
                    completions[who] = [
                        tokenizer.decode(row[keep].tolist(), skip_special_tokens=True)
                        for row, keep in zip(responses, mask, strict=True)
                    ]
                    if who == "policy":
                        results["stop"].extend(worker.completed(responses, mask).tolist())
                        policy_logprobs = worker.logprobs(policy, layout, responses)
                        ref_model, context = worker.reference()
                        with context:
                            ref_logprobs = worker.logprobs(ref_model, layout, responses)
                        results["kl"].extend((policy_logprobs - ref_logprobs).sum(1).tolist())
                results["prompt"].extend(chunk["prompt"])
                results["policy"].extend(completions["policy"])
                results["ref"].extend(completions["ref"])
                for fn in self.functions:
                    for who in ("policy", "ref"):
                        function_values[f"{fn.metric_name}_{who}"].extend(
                            fn.function(chunk["prompt"], completions[who])
                        )
                bar.update(len(chunk))
        return results, function_values


def write_eval(output_dir: Path, metrics: dict[str, float], samples: list[dict[str, Any]]) -> Path:
    path = output_dir / EVAL_FILE
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    with open(output_dir / SAMPLES_FILE, "w") as handle:
        for row in samples:
            handle.write(json.dumps(row) + "\n")
    return path
