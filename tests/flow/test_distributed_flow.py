"""`runtime.num_processes: 2` under the flow: stages 4 and 5 under accelerate launch (gloo on this
CPU), a rank SIGKILLed mid-run, the task's retry resuming, and weights bitwise equal to the engine
launched by hand with the same config (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import torch
import pytest
import yaml

from ppoflow.config import RunConfig
from tests.flow.test_flow import flow_artifacts, policy_tensors, run_flow, stage_states, task_runs
from tests.reliability.faulty_rewards import KILL_RANK_ENV

pytestmark = [pytest.mark.flow, pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
KILLING_REWARD = ("reward_functions=[{path: 'ppoflow.toy:oracle_score', name: oracle, weight: 0.0}, "
                  "{path: 'tests.reliability.faulty_rewards:sigkill_rank_once_after_update', name: killer, weight: 0.0}]")
TWO = ("runtime.num_processes=2", "ppo.total_episodes=96", "ppo.checkpoint_every=2", KILLING_REWARD)


def task_log(task_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])), offset=len(messages)):
            messages += [entry.message for entry in page]
    return "\n".join(messages)


def test_two_processes_under_the_flow_survive_a_killed_rank_and_match_accelerate_launch(flow_env, make_flow_config, flow_workspace, monkeypatch):
    # the engine launched by hand: the reference
    by_hand = make_flow_config("two-by-hand", *TWO)
    config_file = flow_workspace / "two-by-hand.yaml"
    config_file.write_text(yaml.safe_dump(by_hand, sort_keys=False))
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ppoflow.cli", "train", "--config", str(config_file)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-4000:]

    # the flow, whose rank 1 is SIGKILLed in the rollout after update 2 (checkpoint step-2 is on disk)
    tree = make_flow_config("two-flow", *TWO, "flow.retries=1")
    output_dir = Path(tree["output_dir"])
    marker = flow_workspace / "two-flow.killed"
    monkeypatch.setenv(KILL_RANK_ENV, f"1:2:{marker}")
    state = run_flow(tree)

    summary = state.result()
    assert marker.is_file(), "the fault was not injected"
    flow_run_id = state.state_details.flow_run_id
    assert set(stage_states(flow_run_id).values()) == {"Completed"}
    train_run = task_runs(flow_run_id)["train_ppo"]
    assert train_run.run_count == 2  # the failed attempt, then the retry
    logs = task_log(train_run.id)  # what the Prefect UI shows for the task
    assert "exited 1" in logs and "train on 2 processes failed" in logs
    assert "[rank 1]" in logs and "[rank 0]" in logs  # every rank's log in the task's
    assert "resuming from step-000002 (update 2 of 3)" in logs
    assert summary["updates"] == 3 and summary["episodes"] == 96  # 16 prompts × 2 processes per update

    expected = policy_tensors(Path(by_hand["output_dir"]) / "final")
    actual = policy_tensors(output_dir / "final")
    assert expected.keys() == actual.keys() and all(bool((expected[k] == actual[k]).all()) for k in expected)
    ckpt = "checkpoints/step-000003/value/model.safetensors"
    assert (output_dir / ckpt).read_bytes() == (Path(by_hand["output_dir"]) / ckpt).read_bytes()

    # metrics: each update once in MLflow (from rank 0), and the progress artifact at the end
    client = mlflow.MlflowClient(tracking_uri=flow_env)
    assert [p.step for p in client.get_metric_history(summary["mlflow_run_id"], "objective/scores")] == [1, 2, 3]
    progress = [a for a in flow_artifacts(flow_run_id) if a.key == "ppo-training-progress"]
    assert progress and max(float(a.data) for a in progress) == pytest.approx(100.0)
    assert RunConfig.model_validate(tree).config_hash() == json.loads((output_dir / "checkpoints/step-000003/state.json").read_text())["config_hash"]


def test_ppoflow_train_in_one_process_refuses_several(make_flow_config, flow_workspace):
    from ppoflow.errors import ConfigError
    from ppoflow.pipeline import run_all

    tree = make_flow_config("two-alone", "runtime.num_processes=2", "ppo.total_episodes=96")
    with pytest.raises(ConfigError, match=r"`runtime.num_processes`: is 2 and `ppoflow train` is one process .*accelerate launch --num_processes 2"):
        run_all(RunConfig.model_validate(tree))
    assert not (Path(tree["output_dir"]) / "checkpoints").exists()


def test_sharded_training_under_the_flow_registers_a_plain_hugging_face_model(flow_env, make_flow_config, toy_world, flow_workspace):
    """runtime.fsdp under the flow: stages 4 and 5 shard the policy and value over two launched
    processes (with the user's accelerate config file), stage 6 (one process) evaluates and
    registers final/, an ordinary model directory."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    accelerate_config = flow_workspace / "accelerate.yaml"  # as `accelerate config` writes it for one machine
    accelerate_config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nmachine_rank: 0\n"
                                 "num_processes: 2\ngpu_ids: all\nrdzv_backend: static\nsame_network: true\nmain_training_function: main\n")
    tree = make_flow_config("fsdp-flow", "runtime.num_processes=2", "runtime.fsdp=true", "ppo.total_episodes=64", "ppo.eval_every=2",
                            f"runtime.accelerate_config={accelerate_config}")
    state = run_flow(tree)
    summary = state.result()
    output_dir = Path(tree["output_dir"])
    flow_run_id = state.state_details.flow_run_id
    assert set(stage_states(flow_run_id).values()) == {"Completed"}
    assert f"--config_file {accelerate_config} --multi_gpu --num_processes 2" in task_log(task_runs(flow_run_id)["train_ppo"].id)
    assert json.loads((output_dir / "checkpoints/step-000002/state.json").read_text())["fsdp"] is True
    assert summary["updates"] == 2 and summary["registered_model"]["version"]
    final = output_dir / "final"
    assert load_file(final / "model.safetensors").keys() == load_file(toy_world / "policy" / "model.safetensors").keys()  # the SFT model's names
    model = AutoModelForCausalLM.from_pretrained(final)
    assert all(type(p.data) is torch.Tensor for p in model.parameters())  # no DTensor shards left in it
    client = mlflow.MlflowClient(tracking_uri=flow_env)
    assert [p.step for p in client.get_metric_history(summary["mlflow_run_id"], "eval/win_rate")] == [2]
