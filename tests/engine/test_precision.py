"""Precision: trained weights and their optimizer state in fp32 whatever models.dtype says, bf16
compute through autocast, the same precision on both sides of the PPO ratio (issue 17), on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ONE_UPDATE = (
    "ppo.total_episodes=8",
    "ppo.per_device_train_batch_size=8",
    "ppo.num_mini_batches=1",
    "ppo.num_ppo_epochs=1",
    "ppo.learning_rate=3e-6",
)


def test_a_bf16_only_adamw_step_vanishes_and_an_fp32_one_does_not():
    # golden: Adam's first step moves each weight by lr (m/sqrt(v) = 1); 0.02 + 3e-6 rounds back to
    # 0.02 in bf16 (its spacing near 0.02 is 2^-13 ≈ 1.2e-4), while fp32 keeps it
    for dtype, moved in ((torch.bfloat16, False), (torch.float32, True)):
        weight = torch.nn.Parameter(torch.full((4,), 0.02, dtype=dtype))
        weight.grad = torch.ones_like(weight)
        torch.optim.AdamW([weight], lr=3e-6, weight_decay=0.0).step()
        assert bool((weight.detach() != torch.tensor(0.02, dtype=dtype)).all()) is moved
        if moved:
            assert torch.allclose(weight.detach(), torch.full((4,), 0.02 - 3e-6), atol=1e-9)


def change(stages) -> float:
    before = load_file(stages.start.path / "policy" / "model.safetensors")
    after = load_file(stages.final.path / "policy" / "model.safetensors")
    return sum(float((after[k].double() - before[k].double()).norm() ** 2) for k in before) ** 0.5


def test_bf16_training_keeps_fp32_weights_and_updates_them_as_fp32_does(run_stages, tmp_path):
    fp32 = run_stages(*ONE_UPDATE, output_dir=tmp_path / "fp32")
    bf16 = run_stages(*ONE_UPDATE, "models.dtype=bfloat16", output_dir=tmp_path / "bf16")
    trainer = bf16.trainer()
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.value.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.worker.ref.parameters()} == {torch.bfloat16}  # frozen: stored in bf16
    assert {p.dtype for p in trainer.worker.reward.parameters()} == {torch.bfloat16}
    assert trainer.worker.compute_dtype == torch.bfloat16 and not trainer.worker.reuse_logprobs
    with torch.no_grad(), trainer.worker.autocast():  # forwards compute in bf16 over the fp32 weights
        assert trainer.policy(input_ids=torch.tensor([[1, 5, 6]])).logits.dtype == torch.bfloat16
    optimizer = torch.load(bf16.final.path / "optimizer.pt", weights_only=True)
    assert optimizer["state"] and {state["exp_avg"].dtype for state in optimizer["state"].values()} == {torch.float32}
    # one update at lr 3e-6 moves the weights as in fp32 (bf16 compute changes the gradients a little)
    reference, moved = change(fp32), change(bf16)
    assert reference > 0 and 0.5 < moved / reference < 2.0, (moved, reference)


def test_the_first_ratio_is_one_in_bf16(run_stages):
    stages = run_stages(
        "ppo.total_episodes=16",
        "ppo.per_device_train_batch_size=16",
        "ppo.num_mini_batches=1",
        "ppo.num_ppo_epochs=1",
        "models.dtype=bfloat16",
    )
    (first,) = [json.loads(line) for line in (stages.plan.output_dir / "metrics.jsonl").read_text().splitlines()]
    # rollout log-probs and the training forward come from the same bf16 autocast over the same packed
    # layout; what remains is bf16 summation order across different row packings
    assert first["val/ratio"] == pytest.approx(1.0, abs=2e-3), first["val/ratio"]
    assert first["policy/approxkl_avg"] < 1e-4, first["policy/approxkl_avg"]


def test_gradient_checkpointing_gives_the_same_update(run_stages, tmp_path):
    plain = run_stages(*ONE_UPDATE, "ppo.learning_rate=1e-3", output_dir=tmp_path / "plain")
    checkpointed = run_stages(
        *ONE_UPDATE, "ppo.learning_rate=1e-3", "ppo.gradient_checkpointing=true", output_dir=tmp_path / "ckpt"
    )
    trainer = checkpointed.trainer()
    assert trainer.policy.is_activation_checkpointing and trainer.value.is_activation_checkpointing
    for role in ("policy", "value"):
        a = load_file(plain.final.path / role / "model.safetensors")
        b = load_file(checkpointed.final.path / role / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), role
    assert change(plain) > 1e-3


def test_frozen_models_in_bf16_under_fp32_training(run_stages):
    stages = run_stages(*ONE_UPDATE, "ppo.learning_rate=1e-3", "models.dtype=float32", "models.frozen_dtype=bfloat16")
    trainer = stages.trainer()
    assert {p.dtype for p in trainer.worker.ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.worker.reward.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.policy.parameters()} == {torch.float32}
    assert trainer.worker.compute_dtype == torch.float32
    (first,) = [json.loads(line) for line in (stages.plan.output_dir / "metrics.jsonl").read_text().splitlines()]
    # the policy starts as the reference: the KL is only the reference's bf16 rounding, small but not 0
    assert 0 < abs(first["objective/kl"]) < 0.5, first["objective/kl"]
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-6)  # both sides of the ratio in fp32
    assert change(stages) > 1e-3


def test_models_are_loaded_onto_the_device_without_dispatch_hooks(run_stages):
    stages = run_stages(train=False)
    trainer = stages.trainer()
    for model in (trainer.policy, trainer.value, trainer.worker.ref, trainer.worker.reward):
        assert {p.device for p in model.parameters()} == {trainer.accelerator.device}
        assert not any(hasattr(module, "_hf_hook") for module in model.modules())  # one device: no accelerate hooks


def test_the_trainer_applies_the_runtime_section(run_stages):
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        run_stages("runtime.deterministic=false", "runtime.num_threads=1", train=False).trainer()
        assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        run_stages(train=False, output_dir=None).trainer()  # the default: deterministic
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=True)
