"""TRL 1.12 `PPOConfig` settings keep TRL's meaning on the toy world: stop tokens, the logged
learning rate, LoRA dropout, and one loading path for training and evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from ppoflow import pipeline
from ppoflow.rollout import left_pad
from ppoflow.trainer import PPOTrainer

PERIOD = 5  # the toy tokenizer's "."; EOS is 2


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def sample(trainer: PPOTrainer, rows: int = 32):
    prompts = trainer.train_rows.select(range(rows))["input_ids"]
    queries, query_mask = left_pad(prompts, trainer.models.pad_token_id, trainer.accelerator.device)
    torch.manual_seed(0)
    return trainer.worker.generate(queries, query_mask)[:2]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "stop_ids"),
    [("ppo.stop_token=null", []), ("ppo.stop_token=eos", [2]), (f"ppo.stop_token_id={PERIOD}", [PERIOD])],
    ids=["null-runs-to-response_length", "eos", "stop_token_id"],
)
def test_stop_token_has_trls_meaning(run_stages, setting, stop_ids):
    exclusive = ["ppo.stop_token=null"] if "stop_token_id" in setting else []  # the toy configs stop at EOS
    trainer = run_stages(setting, *exclusive, "ppo.response_length=24", train=False).trainer()
    assert trainer.worker.stop_token_ids == stop_ids
    responses, mask = sample(trainer)
    lengths = mask.sum(1)
    if not stop_ids:
        # nothing is truncated: every response is response_length tokens, EOS inside included
        assert bool(mask.all()) and responses.shape[1] == 24
        assert bool((responses[:, :-1] == 2).any()), "the toy policy emits EOS early; the test needs one"
    else:
        (stop,) = stop_ids
        for row, length in zip(responses, lengths.tolist(), strict=True):
            real = row[:length].tolist()
            # cut right after the first stop token, or not at all
            assert stop not in real[:-1] and (real[-1] == stop or length == responses.shape[1])
        assert bool((lengths < responses.shape[1]).any())


@pytest.mark.slow
def test_missing_eos_penalty_goes_by_the_stop_token_id(run_stages):
    # stop_token_id = ".": a response with an EOS but no "." did not end with the stop token
    trainer = run_stages(
        f"ppo.stop_token_id={PERIOD}", "ppo.stop_token=null", "ppo.response_length=24", train=False
    ).trainer()
    responses, mask = sample(trainer)
    complete = trainer.worker.completed(responses, mask)
    ends_with_period = torch.tensor([bool(row[m][-1] == PERIOD) for row, m in zip(responses, mask, strict=True)])
    assert torch.equal(complete, ends_with_period)


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "eos_token_id"), [("ppo.stop_token=null", []), ("ppo.stop_token=eos", [2])])
def test_final_generation_config_stops_as_training_did(make_config, setting, eos_token_id):
    config = make_config(
        setting,
        "ppo.total_episodes=8",
        "ppo.per_device_train_batch_size=8",
        "ppo.num_mini_batches=1",
        "ppo.response_length=12",
        "data.eval_size=8",
        "eval.batch_size=8",
    )
    plan, release = pipeline.run_all(config)
    saved = json.loads((release.policy_dir / "generation_config.json").read_text())
    assert saved["eos_token_id"] == eos_token_id
    (metrics,) = read_metrics(plan.output_dir)
    if not eos_token_id:
        assert metrics["response/length_mean"] == 12.0  # every rollout ran to response_length
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(release.policy_dir)
        prompt = torch.tensor([[1, 149]])
        out = reloaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False)
        assert out.shape[1] == 2 + 12
    else:
        assert metrics["response/length_mean"] < 12.0


@pytest.mark.slow
def test_lr_metric_is_the_rate_the_update_used(run_stages):
    # 2 updates × 1 epoch × 2 mini-batches = 4 optimizer steps on a linear schedule from 1e-3:
    # the steps use 1e-3 × (1, 3/4, 1/2, 1/4); update 1 logs their mean 0.875e-3, update 2 0.375e-3
    # (reading the scheduler after the update, as before, logged the next update's 0.5e-3, then 0.0).
    stages = run_stages(
        "ppo.total_episodes=16",
        "ppo.per_device_train_batch_size=4",
        "ppo.gradient_accumulation_steps=2",
        "ppo.num_mini_batches=2",
        "ppo.learning_rate=1e-3",
    )
    assert [m["lr"] for m in read_metrics(stages.plan.output_dir)] == pytest.approx([0.875e-3, 0.375e-3], rel=1e-9)


@pytest.mark.slow
def test_first_ratio_is_one_with_lora(run_stages):
    # LoRA adds no dropout (it is added after the base model's dropout was disabled)
    trainer = run_stages(
        "peft.enabled=true",
        "peft.target_modules=[q_proj,v_proj]",
        "ppo.total_episodes=16",
        "ppo.per_device_train_batch_size=16",
        "ppo.num_mini_batches=1",
        train=False,
    ).trainer()
    assert all(module.p == 0.0 for module in trainer.policy.modules() if isinstance(module, torch.nn.Dropout))
    trainer.train()
    (first,) = read_metrics(trainer.output_dir)
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/approxkl_avg"] < 1e-9


@pytest.mark.slow
def test_evaluation_loads_models_as_training_does(run_stages, monkeypatch):
    # models.trust_remote_code reaches every from_pretrained of stage 6 too (reward and reference)
    stages = run_stages(
        "models.trust_remote_code=true",
        "ppo.total_episodes=8",
        "ppo.per_device_train_batch_size=8",
        "ppo.num_mini_batches=1",
        "data.eval_size=8",
        "eval.batch_size=8",
        train=False,
    )
    calls = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        original = auto.from_pretrained.__func__

        def recording(cls, *args, _original=original, **kwargs):
            calls.append((cls.__name__, kwargs.get("trust_remote_code")))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(recording))
    pipeline.save_and_evaluate(stages.plan, stages.models, stages.data, stages.start)
    assert {name for name, _ in calls} == {"AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    assert all(trust is True for _, trust in calls), calls
