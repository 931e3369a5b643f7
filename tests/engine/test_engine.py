"""End-to-end behaviour of the PPO engine on the toy world (no Prefect, no MLflow)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ppoflow import pipeline
from ppoflow.checkpoint import list_checkpoints, read_state
from ppoflow.config import RunConfig

pytestmark = pytest.mark.slow  # every test trains on the toy world

REPO = Path(__file__).resolve().parents[2]


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def weights(policy_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(policy_dir.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    differing = [name for name in left if not torch.equal(left[name], right[name])]
    assert not differing, f"tensors differ: {differing[:5]}"


def write_config(config: RunConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


@pytest.mark.parametrize(
    "variant",
    [
        (),  # packed; rollout log-probs recorded during generation
        ("ppo.pack_sequences=false", "ppo.top_k=50"),  # padded; top-k sampling, so log-probs from a forward
    ],
    ids=["packed-generation-logprobs", "padded-forward-logprobs"],
)
def test_first_ratio_is_one_and_one_step_per_mini_batch(run_stages, variant):
    # One micro-batch per mini-batch and one epoch: the first forward happens before any optimizer
    # step, so the rollout's log-probs must equal the training forward's (ratio 1, approxkl 0).
    stages = run_stages(
        "ppo.total_episodes=16",
        "ppo.per_device_train_batch_size=16",
        "ppo.num_mini_batches=1",
        "ppo.local_rollout_forward_batch_size=8",
        *variant,
    )
    (first,) = read_metrics(stages.plan.output_dir)
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/approxkl_avg"] < 1e-9
    assert first["policy/clipfrac_avg"] == 0.0


def test_optimizer_steps_follow_num_mini_batches(run_stages):
    # TRL 1.12 stepped once per epoch whatever num_mini_batches was; we step once per mini-batch:
    # batches of 4 × 4 = 16 prompts in 2 mini-batches of 8 (2 micro-batches of 4 each);
    # 2 updates × 3 epochs × 2 mini-batches = 12 steps.
    stages = run_stages(
        "ppo.total_episodes=32",
        "ppo.per_device_train_batch_size=4",
        "ppo.gradient_accumulation_steps=4",
        "ppo.num_mini_batches=2",
        "ppo.num_ppo_epochs=3",
        "ppo.checkpoint_every=5",
    )
    batch = stages.plan.batch
    assert (batch.local_mini_batch_size, batch.batch_size, batch.num_updates) == (8, 16, 2)
    state = read_state(stages.final.path)
    assert state["optimizer_steps"] == 12
    scheduler = torch.load(stages.final.path / "scheduler.pt", weights_only=True)
    assert scheduler["last_epoch"] == 12
    assert [m["episode"] for m in read_metrics(stages.plan.output_dir)] == [16, 32]


def test_toy_run_improves_reward_and_oracle(make_config):
    config = make_config(
        "ppo.total_episodes=768",
        "ppo.per_device_train_batch_size=16",
        "ppo.gradient_accumulation_steps=4",
        "ppo.num_mini_batches=4",
        "ppo.local_rollout_forward_batch_size=64",
        "ppo.num_ppo_epochs=2",
        "ppo.response_length=20",
        "ppo.learning_rate=1e-4",
        "ppo.missing_eos_penalty=2.0",
        "ppo.checkpoint_every=100",
        "data.eval_size=96",
        "eval.batch_size=96",
    )
    plan, release = pipeline.run_all(config)
    metrics = read_metrics(plan.output_dir)
    assert len(metrics) == 12
    early = sum(m["objective/scores"] for m in metrics[:3]) / 3
    late = sum(m["objective/scores"] for m in metrics[-3:]) / 3
    assert late > early + 0.2, (early, late)
    assert max(m["objective/kl"] for m in metrics) < 5.0
    result = json.loads((plan.output_dir / "eval.json").read_text())
    assert result == release.eval_metrics
    assert result["reward_policy"] > result["reward_ref"] + 0.2
    assert result["oracle_policy"] > result["oracle_ref"] + 0.1
    assert result["win_rate"] > 0.6
    assert 0.0 <= result["kl"] < 5.0
    assert result["eos_rate"] > 0.6
    samples = [json.loads(line) for line in (plan.output_dir / "samples.jsonl").read_text().splitlines()]
    assert (
        len(samples) == 4
        and {"prompt", "policy_completion", "ref_completion", "policy_score", "ref_score"} <= samples[0].keys()
    )


def checkpoint_files(checkpoint: Path) -> dict[str, bytes]:
    """A checkpoint's files but its state.json (which names the config hash) and the manifest of their checksums."""
    return {
        str(path.relative_to(checkpoint)): path.read_bytes()
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.name not in ("state.json", "manifest.json")
    }


def test_eval_every_evaluates_at_its_updates_and_the_last_as_stage_6_without_changing_training(run_stages, tmp_path):
    # 40 episodes in batches of 8: five updates, evaluated after 2, 4 and the last. The evaluation draws no
    # random number training draws, so the run without it writes the same checkpoint byte for byte
    # (weights, optimizer, scheduler, RNG states) and the same training metrics.
    plain = run_stages("ppo.total_episodes=40", output_dir=tmp_path / "plain")
    evaluated = run_stages("ppo.total_episodes=40", "ppo.eval_every=2", output_dir=tmp_path / "evaluated")
    assert evaluated.final.update == 5
    assert checkpoint_files(evaluated.final.path) == checkpoint_files(plain.final.path)
    rows = read_metrics(evaluated.plan.output_dir)
    assert [row["update"] for row in rows if any(key.startswith("eval/") for key in row)] == [2, 4, 5]

    def training(row: dict) -> dict:
        return {key: value for key, value in row.items() if not key.startswith(("eval/", "timing/", "perf/"))}

    assert [training(row) for row in rows] == [training(row) for row in read_metrics(plain.plan.output_dir)]
    for row in rows[1], rows[3], rows[4]:
        assert 0.0 <= row["eval/win_rate"] <= 1.0 and 0.0 <= row["eval/eos_rate"] <= 1.0
        assert row["eval/num_prompts"] == 32 and row["timing/eval"] > 0
        assert {
            "eval/reward_policy",
            "eval/reward_ref",
            "eval/kl",
            "eval/oracle_policy",
            "eval/oracle_ref",
        } <= row.keys()
    # The policy trained in between: its KL to the reference moved. (Not its reward: at this learning rate
    # the same seeds can still sample the same 32 answers, as they do with transformers 5.25.)
    assert rows[1]["eval/kl"] != rows[4]["eval/kl"]
    # The last update's evaluation is stage 6's, of the same weights: the same numbers, key for key.
    release = pipeline.save_and_evaluate(evaluated.plan, evaluated.models, evaluated.data, evaluated.final)
    assert {f"eval/{key}": value for key, value in release.eval_metrics.items()} == {
        key: value for key, value in rows[-1].items() if key.startswith("eval/")
    }


def run_train(config_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ppoflow.cli", "train", "--config", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def metric_lines(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_after_next_update(process: subprocess.Popen, output_dir: Path, rng: random.Random) -> bool:
    """SIGKILL the run at a random moment shortly after it logs its next update (a checkpoint
    write, the next rollout or training). False when it finished first."""
    seen = metric_lines(output_dir)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        if metric_lines(output_dir) > seen:
            time.sleep(rng.uniform(0.0, 0.4))
            if process.poll() is not None:
                return False
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.01)
    return False


def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(make_config, tmp_path):
    overrides = (
        "ppo.total_episodes=96",
        "ppo.per_device_train_batch_size=8",
        "ppo.gradient_accumulation_steps=2",
        "ppo.num_mini_batches=2",
        "ppo.eval_every=2",
    )
    reference = make_config(*overrides, output_dir=tmp_path / "uninterrupted")
    killed = make_config(*overrides, output_dir=tmp_path / "killed")
    assert reference.config_hash() == killed.config_hash()  # one training, written in two places

    log = tmp_path / "train.log"
    assert run_train(write_config(reference, tmp_path / "a.yaml"), log).wait(timeout=600) == 0

    rng = random.Random(20261124)
    config_path = write_config(killed, tmp_path / "b.yaml")
    kills = 0
    while kills < 3 and kill_after_next_update(run_train(config_path, log), tmp_path / "killed", rng):
        kills += 1
    assert kills == 3, log.read_text()[-3000:]
    assert run_train(config_path, log).wait(timeout=600) == 0, log.read_text()[-3000:]
    assert_same_weights(tmp_path / "uninterrupted" / "final", tmp_path / "killed" / "final")
    updates = [m["update"] for m in read_metrics(tmp_path / "killed")]
    assert updates == list(range(1, 7)), updates  # 96 episodes / 16 per batch, each logged once
    # evaluated after updates 2, 4 and 6 (eval_every=2), a resumed run with the same numbers
    evaluations = [eval_metrics_of(m) for m in read_metrics(tmp_path / "killed")]
    assert [bool(e) for e in evaluations] == [False, True] * 3
    assert evaluations == [eval_metrics_of(m) for m in read_metrics(tmp_path / "uninterrupted")]


def eval_metrics_of(row: dict) -> dict:
    """An update's evaluation as eval.json has it (`eval/win_rate` -> `win_rate`)."""
    return {key.removeprefix("eval/"): value for key, value in row.items() if key.startswith("eval/")}


def test_lora_run_has_no_reference_copy(run_stages):
    stages = run_stages(
        "peft.enabled=true",
        "peft.target_modules=[q_proj,v_proj]",
        "ppo.learning_rate=1e-3",
        "peft.merge_on_save=true",
        "ppo.eval_every=4",
        train=False,
    )
    plan, models, data = stages.plan, stages.models, stages.data
    assert models.ref is None
    trainer = stages.trainer()
    assert trainer.worker.ref is None
    lora_parameters = sum(p.numel() for p in trainer.policy.parameters() if p.requires_grad)
    assert 0 < lora_parameters < 0.1 * models.policy.num_parameters
    final = trainer.train()
    release = pipeline.save_and_evaluate(plan, models, data, final)
    assert (release.policy_dir / "adapter_config.json").is_file()
    assert release.merged_dir is not None and (release.merged_dir / "config.json").is_file()
    assert (
        list_checkpoints(plan.output_dir / "checkpoints")[0].joinpath("policy", "adapter_model.safetensors").is_file()
    )
    assert set(release.eval_metrics) >= {
        "reward_policy",
        "reward_ref",
        "win_rate",
        "kl",
        "eos_rate",
        "oracle_policy",
        "oracle_ref",
    }
    # evaluated during training too (reference: the adapter disabled), as stage 6 evaluates the saved adapter
    rows = read_metrics(plan.output_dir)
    assert [row["update"] for row in rows if "eval/kl" in row] == [4]
    assert eval_metrics_of(rows[-1]) == release.eval_metrics


def test_no_held_out_prompts_saves_the_policy_and_reports_no_evaluation(run_stages):
    """data.eval_size 0 (no promotion gate to judge): stage 6 saves final/ and its eval.json counts no
    prompts, rather than dividing by zero after the training."""
    stages = run_stages("data.eval_size=0", "tracking.promotion=null", "ppo.total_episodes=16")
    release = pipeline.save_and_evaluate(stages.plan, stages.models, stages.data, stages.final)
    assert json.loads(release.eval_path.read_text()) == {"num_prompts": 0.0} == release.eval_metrics
    assert (stages.plan.output_dir / "samples.jsonl").read_text() == ""
    assert_same_weights(release.policy_dir, stages.final.path / "policy")


@pytest.mark.distributed
def test_two_processes_under_accelerate_launch(make_config, tmp_path):
    config = make_config(
        "ppo.total_episodes=64",
        "ppo.per_device_train_batch_size=8",
        "ppo.num_mini_batches=1",
        "ppo.checkpoint_every=2",
        "ppo.eval_every=3",
    )
    config_path = write_config(config, tmp_path / "dist.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "ppoflow.cli",
            "train",
            "--config",
            str(config_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, "only the main process prints the summary"
    summary = json.loads(summaries[0])
    assert summary["episodes"] == 64 and summary["updates"] == 4  # batch = 8 × 2 processes
    metrics = read_metrics(Path(summary["output_dir"]))
    assert [m["update"] for m in metrics] == [1, 2, 3, 4]
    # the main process evaluated, the other waited
    assert [m["update"] for m in metrics if "eval/win_rate" in m] == [3, 4]
    assert eval_metrics_of(metrics[-1]) == summary["eval"]  # stage 6's numbers (one process) at the last update
    checkpoints = [p.name for p in list_checkpoints(Path(summary["output_dir"]) / "checkpoints")]
    assert checkpoints == ["step-000004", "step-000002", "step-000000"]
    assert read_state(Path(summary["output_dir"]) / "checkpoints" / "step-000004")["world_size"] == 2


def test_max_grad_norm_is_honoured(run_stages, tmp_path):
    # With adam_epsilon = 1, one AdamW step moves a weight by about lr × g / (|g| + 1): proportional
    # to the gradient when gradients are small. Clipping the global norm to 1e-6 must then shrink
    # the change of the weights by orders of magnitude against an unclipped step (TRL ignored it).
    def weight_change(max_grad_norm: str, name: str) -> float:
        stages = run_stages(
            "ppo.total_episodes=8",
            "ppo.per_device_train_batch_size=8",
            "ppo.num_mini_batches=1",
            "ppo.adam_epsilon=1.0",
            "ppo.learning_rate=1e-2",
            f"ppo.max_grad_norm={max_grad_norm}",
            output_dir=tmp_path / name,
        )
        before, after = weights(stages.start.path / "policy"), weights(stages.final.path / "policy")
        return sum(float((after[k] - before[k]).double().norm() ** 2) for k in before) ** 0.5

    unclipped = weight_change("null", "unclipped")
    clipped = weight_change("1e-6", "clipped")
    assert unclipped > 1e-4
    assert clipped < 1e-3 * unclipped, (clipped, unclipped)
