"""One workspace, one training at a time: stage 3 archives a training of other data or models (a new
partition, a moved alias) before writing the new data, and stages 4 and 5 refuse to continue one
(fake checkpoints, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ppoflow import pipeline
from ppoflow.batching import BatchPlan
from ppoflow.checkpoint import verify_checkpoint, write_checkpoint
from ppoflow.config import DataConfig, ModelsConfig, PPOConfig, RunConfig
from ppoflow.errors import ConfigError
from ppoflow.manifests import DatasetManifest, ModelManifest, ModelSource, RunPlan, training_fingerprint
from ppoflow.workspace import SPOOL_FILE

TONIGHT, LAST_NIGHT = "a" * 64, "b" * 64


@pytest.fixture
def plan(tmp_path) -> RunPlan:
    config = RunConfig(
        output_dir=tmp_path / "run",
        models=ModelsConfig(policy="org/policy", reward="org/reward"),
        data=DataConfig(path=str(tmp_path / "prompts"), eval_size=1),
        ppo=PPOConfig(total_episodes=32, per_device_train_batch_size=8),
    )
    return RunPlan(
        config=config,
        config_hash=config.config_hash(),
        output_dir=config.output_dir,
        batch=BatchPlan.derive(config.ppo),
    )


@pytest.fixture
def model_manifest(tmp_path) -> ModelManifest:
    """Stage 2's manifest over a tiny WordLevel tokenizer (the models: stand-ins with hashes)."""
    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<unk>", "the", "cat", "dog", "sat", "ran"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(tmp_path / "tok")
    return ModelManifest(
        policy=model_source("policy", "1"),
        ref=model_source("ref", "1"),
        reward=model_source("reward", "2"),
        value=model_source("value", "2"),
        tokenizer_dir=tmp_path / "tok",
        tokenizer_sha256="3" * 64,
        pad_token_id=0,
        eos_token_id=1,
        stop_token_id=1,
    )


def model_source(role: str, digit: str) -> ModelSource:
    return ModelSource(
        role=role,
        source=f"org/{role}",
        revision=None,
        local_dir=Path("/nowhere"),
        sha256=digit * 64,
        model_class="M",
        num_parameters=1,
    )


def data(tmp_path: Path, fingerprint: str) -> DatasetManifest:
    return DatasetManifest(
        train_dir=tmp_path / "train",
        eval_dir=tmp_path / "eval",
        fingerprint=fingerprint,
        source="prompts",
        rows_read=9,
        rows_kept=9,
        dropped_too_long=0,
        dropped_empty=0,
        eos_stripped=0,
        eos_dropped=0,
        train_rows=8,
        eval_rows=1,
        train_digest="c" * 64,
        eval_digest="d" * 64,
    )


def fake_checkpoint(plan: RunPlan, update: int, training: str | None) -> Path:
    state = {
        "update": update,
        "episode": update * 8,
        "optimizer_steps": update,
        "num_updates": 4,
        "config_hash": plan.config_hash,
        "world_size": 1,
    }
    if training is not None:
        state["training_fingerprint"] = training
    return write_checkpoint(
        plan.output_dir / "checkpoints", update, lambda directory: (directory / "policy.bin").write_bytes(b"w"), state
    )


def test_the_training_fingerprint_follows_every_model_the_tokenizer_and_the_data(model_manifest):
    base = training_fingerprint(model_manifest, TONIGHT)
    assert len(base) == 64 and base == training_fingerprint(model_manifest, TONIGHT)
    assert training_fingerprint(model_manifest, LAST_NIGHT) != base
    promoted = model_manifest.model_copy(update={"policy": model_source("policy", "9")})  # the alias moved
    assert training_fingerprint(promoted, TONIGHT) != base
    # LoRA: no separate reference
    assert training_fingerprint(model_manifest.model_copy(update={"ref": None}), TONIGHT) != base
    assert training_fingerprint(model_manifest.model_copy(update={"tokenizer_sha256": "4" * 64}), TONIGHT) != base


@pytest.mark.parametrize("stage", ["init_trainer", "train"])
def test_stages_four_and_five_refuse_checkpoints_of_another_training_and_keep_them(
    plan, tmp_path, model_manifest, stage
):
    last_night = training_fingerprint(model_manifest, LAST_NIGHT)
    step_zero = fake_checkpoint(plan, 0, last_night)
    finished = fake_checkpoint(plan, 4, last_night)
    with pytest.raises(ConfigError) as raised:
        getattr(pipeline, stage)(plan, model_manifest, data(tmp_path, TONIGHT))
    tonight = training_fingerprint(model_manifest, TONIGHT)
    assert str(raised.value) == (
        f"config field `output_dir`: {plan.output_dir} holds a training of other models "
        f"or data (training fingerprint {last_night[:16]}, this run's {tonight[:16]}) — "
        "run stage 3 (prepare_dataset) first, which archives it, or use a new output_dir"
    )
    assert (step_zero / "manifest.json").is_file() and (finished / "manifest.json").is_file()


def test_checkpoints_of_the_same_training_are_reused(plan, tmp_path, model_manifest):
    tonight = training_fingerprint(model_manifest, TONIGHT)
    fake_checkpoint(plan, 0, tonight)
    fake_checkpoint(plan, 4, tonight)
    assert pipeline.init_trainer(plan, model_manifest, data(tmp_path, TONIGHT)).update == 0
    final = pipeline.train(plan, model_manifest, data(tmp_path, TONIGHT))
    assert (final.update, final.episode, final.num_updates) == (4, 32, 4)


def test_checkpoints_without_a_recorded_fingerprint_still_load(plan, tmp_path, model_manifest):
    fake_checkpoint(plan, 0, None)
    fake_checkpoint(plan, 4, None)
    assert pipeline.init_trainer(plan, model_manifest, data(tmp_path, TONIGHT)).update == 0
    assert pipeline.train(plan, model_manifest, data(tmp_path, TONIGHT)).update == 4


def write_night(tmp_path: Path, day: str, prompts: list[str]) -> None:
    (tmp_path / "prompts").mkdir(exist_ok=True)
    (tmp_path / "prompts" / f"prompts-{day}.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    )


def test_stage_three_archives_another_training_whole_before_writing_the_new_data(plan, tmp_path, model_manifest):
    write_night(tmp_path, "2026-11-30", ["the cat sat", "the dog ran", "the cat ran"])
    last_night = pipeline.prepare_dataset(plan, model_manifest)
    trained = training_fingerprint(model_manifest, last_night.fingerprint)
    checkpoints = [fake_checkpoint(plan, update, trained) for update in (0, 4)]
    for name, text in (
        ("metrics.jsonl", '{"update": 1}\n'),
        ("eval.json", "{}"),
        (SPOOL_FILE, "{}\n"),
        ("config.yaml", "output_dir: run\n"),
    ):
        (plan.output_dir / name).write_text(text)
    (plan.output_dir / "final").mkdir()
    (plan.output_dir / "final" / "model.safetensors").write_bytes(b"weights")
    prepared = (plan.output_dir / "data" / "dataset.json").read_text()
    # the same data: prepared again, nothing archived
    assert pipeline.prepare_dataset(plan, model_manifest) == last_night
    assert not (plan.output_dir / "archive").exists()

    write_night(tmp_path, "2026-12-01", ["the dog sat"])
    tonight = pipeline.prepare_dataset(plan, model_manifest)

    assert tonight.fingerprint != last_night.fingerprint and tonight.is_intact()
    (archived,) = (plan.output_dir / "archive").iterdir()
    assert archived.name.endswith(f"-{trained[:16]}")
    assert sorted(path.name for path in archived.iterdir()) == sorted(
        ["checkpoints", "data", "eval.json", "final", "metrics.jsonl", SPOOL_FILE]
    )
    assert (archived / "data" / "dataset.json").read_text() == prepared  # last night's data, as it was
    for checkpoint in checkpoints:  # whole and intact, only moved
        assert verify_checkpoint(archived / "checkpoints" / checkpoint.name)
    assert (archived / "final" / "model.safetensors").read_bytes() == b"weights"
    # stage 1's stays
    assert sorted(path.name for path in plan.output_dir.iterdir()) == ["archive", "config.yaml", "data"]
    assert set(pipeline.TRAINING_PRODUCTS) >= {SPOOL_FILE, "checkpoints", "final", "final-merged", "samples.jsonl"}


@pytest.mark.parametrize(("keep", "kept_nights"), [(None, [1, 2, 3]), (2, [2, 3]), (0, [])])
def test_runtime_keep_archives_keeps_the_newest_archived_trainings(plan, tmp_path, model_manifest, keep, kept_nights):
    plan = plan.model_copy(
        update={
            "config": plan.config.model_copy(
                update={"runtime": plan.config.runtime.model_copy(update={"keep_archives": keep})}
            )
        }
    )
    trained = {}
    for night, day in enumerate(("2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01"), start=1):
        write_night(tmp_path, day, [f"the cat sat {'dog ' * night}", "the dog ran", "the cat ran"])
        manifest = pipeline.prepare_dataset(plan, model_manifest)
        trained[night] = training_fingerprint(model_manifest, manifest.fingerprint)
        fake_checkpoint(plan, 0, trained[night])  # night N trained: night N+1's stage 3 archives it
    archive = plan.output_dir / "archive"
    kept = sorted(path.name for path in archive.iterdir()) if archive.is_dir() else []
    assert [name.rsplit("-", 1)[1] for name in kept] == [trained[night][:16] for night in kept_nights]
    assert (plan.output_dir / "checkpoints" / "step-000000").is_dir()  # tonight's training is never touched
