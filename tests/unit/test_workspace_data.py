"""Stages 3, 4 and 5 refuse a workspace whose checkpoints were trained on other data (fake checkpoints, no model)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ppoflow import pipeline
from ppoflow.checkpoint import write_checkpoint
from ppoflow.config import BatchPlan, DataConfig, ModelsConfig, PPOConfig, RunConfig
from ppoflow.errors import ConfigError
from ppoflow.manifests import DatasetManifest, RunPlan

TONIGHT, LAST_NIGHT = "a" * 64, "b" * 64


@pytest.fixture
def plan(tmp_path) -> RunPlan:
    config = RunConfig(
        output_dir=tmp_path / "run",
        models=ModelsConfig(policy="org/policy", reward="org/reward"),
        data=DataConfig(path=str(tmp_path / "prompts"), eval_size=1),
        ppo=PPOConfig(total_episodes=32, per_device_train_batch_size=8),
    )
    return RunPlan(config=config, config_hash=config.config_hash(), output_dir=config.output_dir, batch=BatchPlan.derive(config.ppo))


def data(tmp_path: Path, fingerprint: str) -> DatasetManifest:
    return DatasetManifest(
        train_dir=tmp_path / "train", eval_dir=tmp_path / "eval", fingerprint=fingerprint, source="prompts", rows_read=9,
        rows_kept=9, dropped_too_long=0, dropped_empty=0, eos_stripped=0, eos_dropped=0, train_rows=8, eval_rows=1,
        train_digest="c" * 64, eval_digest="d" * 64,
    )


def fake_checkpoint(plan: RunPlan, update: int, fingerprint: str | None) -> Path:
    state = {"update": update, "episode": update * 8, "optimizer_steps": update, "num_updates": 4, "config_hash": plan.config_hash, "world_size": 1}
    if fingerprint is not None:
        state["data_fingerprint"] = fingerprint
    return write_checkpoint(plan.output_dir / "checkpoints", update, lambda directory: (directory / "policy.bin").write_bytes(b"w"), state)


@pytest.mark.parametrize("stage", ["init_trainer", "train"])
def test_checkpoints_of_other_data_are_refused_and_kept(plan, tmp_path, stage):
    step_zero = fake_checkpoint(plan, 0, LAST_NIGHT)
    finished = fake_checkpoint(plan, 4, LAST_NIGHT)
    with pytest.raises(ConfigError) as raised:
        getattr(pipeline, stage)(plan, None, data(tmp_path, TONIGHT))
    message = str(raised.value)
    assert message == (
        f"config field `output_dir`: {plan.output_dir} holds a training on other data (fingerprint {'b' * 16}, this run's "
        f"{'a' * 16}) — give each data window its own workspace: put {{date}} or {{flow_run}} in output_dir, or use a new output_dir"
    )
    assert (step_zero / "manifest.json").is_file() and (finished / "manifest.json").is_file()


def test_checkpoints_of_the_same_data_are_reused(plan, tmp_path):
    fake_checkpoint(plan, 0, TONIGHT)
    fake_checkpoint(plan, 4, TONIGHT)
    assert pipeline.init_trainer(plan, None, data(tmp_path, TONIGHT)).update == 0
    final = pipeline.train(plan, None, data(tmp_path, TONIGHT))
    assert (final.update, final.episode, final.num_updates) == (4, 32, 4)


def test_checkpoints_without_a_recorded_fingerprint_still_load(plan, tmp_path):
    fake_checkpoint(plan, 0, None)
    fake_checkpoint(plan, 4, None)
    assert pipeline.init_trainer(plan, None, data(tmp_path, TONIGHT)).update == 0
    assert pipeline.train(plan, None, data(tmp_path, TONIGHT)).update == 4


def write_night(tmp_path: Path, day: str, prompts: list[str]) -> None:
    (tmp_path / "prompts").mkdir(exist_ok=True)
    (tmp_path / "prompts" / f"prompts-{day}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def test_stage_three_refuses_before_replacing_the_data_of_another_training(plan, tmp_path):
    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<unk>", "the", "cat", "dog", "sat", "ran"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path / "tok")
    model_manifest = SimpleNamespace(tokenizer_dir=tmp_path / "tok")
    write_night(tmp_path, "2026-11-30", ["the cat sat", "the dog ran", "the cat ran"])
    last_night = pipeline.prepare_dataset(plan, model_manifest)
    fake_checkpoint(plan, 0, last_night.fingerprint)
    prepared = (plan.output_dir / "data" / "dataset.json").read_text()
    assert pipeline.prepare_dataset(plan, model_manifest) == last_night  # the same data: prepared again, same manifest

    write_night(tmp_path, "2026-12-01", ["the dog sat"])
    with pytest.raises(ConfigError, match=f"holds a training on other data .fingerprint {last_night.fingerprint[:16]}, "):
        pipeline.prepare_dataset(plan, model_manifest)
    assert (plan.output_dir / "data" / "dataset.json").read_text() == prepared
