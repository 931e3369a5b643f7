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
import pytest
import torch
import yaml

from ppoflow.config import RunConfig
from tests.flow.test_flow import flow_artifacts, policy_tensors, run_flow, stage_states, task_runs
from tests.reliability.faulty_rewards import KILL_RANK_ENV

pytestmark = [pytest.mark.flow, pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
KILLING_REWARD = (
    "reward_functions=[{path: 'ppoflow.toy:oracle_score', name: oracle, weight: 0.0}, "
    "{path: 'tests.reliability.faulty_rewards:sigkill_rank_once_after_update', name: killer, weight: 0.0}]"
)
TWO = ("runtime.num_processes=2", "ppo.total_episodes=96", "ppo.checkpoint_every=2", KILLING_REWARD)


def task_log(task_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(
            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])), offset=len(messages)
        ):
            messages += [entry.message for entry in page]
    return "\n".join(messages)


@pytest.fixture(scope="module")
def by_hand(make_flow_config, flow_workspace) -> Path:
    """The engine launched by hand on 2 processes, uninterrupted: the reference."""
    tree = make_flow_config("two-by-hand", *TWO)
    config_file = flow_workspace / "two-by-hand.yaml"
    config_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    launched = subprocess.run(
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
            str(config_file),
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-4000:]
    return Path(tree["output_dir"])


def assert_same_weights(reference: Path, output_dir: Path) -> None:
    expected = policy_tensors(reference / "final")
    actual = policy_tensors(output_dir / "final")
    assert expected.keys() == actual.keys() and all(bool((expected[k] == actual[k]).all()) for k in expected)
    ckpt = "checkpoints/step-000003/value/model.safetensors"
    assert (output_dir / ckpt).read_bytes() == (reference / ckpt).read_bytes()


def test_two_processes_under_the_flow_survive_a_killed_rank_and_match_accelerate_launch(
    flow_env, by_hand, make_flow_config, flow_workspace, monkeypatch
):
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
    assert_same_weights(by_hand, output_dir)

    # metrics: each update once in MLflow (from rank 0), and the progress artifact at the end
    client = mlflow.MlflowClient(tracking_uri=flow_env)
    assert [p.step for p in client.get_metric_history(summary["mlflow_run_id"], "objective/scores")] == [1, 2, 3]
    progress = [a for a in flow_artifacts(flow_run_id) if a.key == "ppo-training-progress"]
    assert progress and max(float(a.data) for a in progress) == pytest.approx(100.0)
    assert (
        RunConfig.model_validate(tree).config_hash()
        == json.loads((output_dir / "checkpoints/step-000003/state.json").read_text())["config_hash"]
    )


def test_ppoflow_train_in_one_process_refuses_several(make_flow_config, flow_workspace):
    from ppoflow.errors import ConfigError
    from ppoflow.pipeline import run_all

    tree = make_flow_config("two-alone", "runtime.num_processes=2", "ppo.total_episodes=96")
    with pytest.raises(
        ConfigError,
        match=r"`runtime.num_processes`: is 2 and `ppoflow train` is one process .*accelerate launch --num_processes 2",
    ):
        run_all(RunConfig.model_validate(tree))
    assert not (Path(tree["output_dir"]) / "checkpoints").exists()


def test_sharded_training_under_the_flow_registers_a_plain_hugging_face_model(
    flow_env, make_flow_config, toy_world, flow_workspace
):
    """FSDP asked for the accelerate way (an `accelerate config` file with distributed_type FSDP)
    under the flow: stages 4 and 5 shard the policy and value over two launched processes with
    ppoflow's own sharding (accelerate launch gets the file as plain processes), stage 6 (one
    process) evaluates and registers final/, an ordinary model directory."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # as `accelerate config` writes it for FSDP2 on one machine
    accelerate_config = flow_workspace / "accelerate-fsdp.yaml"
    accelerate_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n"
        "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        "  fsdp_cpu_ram_efficient_loading: false\n  fsdp_offload_params: false\n  fsdp_reshard_after_forward: true\n"
        "  fsdp_state_dict_type: FULL_STATE_DICT\n  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n"
        "  fsdp_version: 2\n"
        "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nnum_processes: 2\ngpu_ids: all\n"
        "rdzv_backend: static\nsame_network: true\nmain_training_function: main\n"
    )
    tree = make_flow_config(
        "fsdp-flow",
        "runtime.num_processes=2",
        "ppo.total_episodes=64",
        "ppo.eval_every=2",
        f"runtime.accelerate_config={accelerate_config}",
    )
    state = run_flow(tree)
    summary = state.result()
    output_dir = Path(tree["output_dir"])
    flow_run_id = state.state_details.flow_run_id
    assert set(stage_states(flow_run_id).values()) == {"Completed"}
    launched = output_dir / "launch" / "accelerate.yaml"  # the user's file as plain processes: ppoflow shards itself
    assert f"--config_file {launched} --multi_gpu --num_processes 2" in task_log(task_runs(flow_run_id)["train_ppo"].id)
    assert yaml.safe_load(launched.read_text())["distributed_type"] == "MULTI_GPU"
    assert json.loads((output_dir / "checkpoints/step-000002/state.json").read_text())["fsdp"] is True
    assert summary["updates"] == 2 and summary["registered_model"]["version"]
    final = output_dir / "final"
    # the SFT model's names
    assert load_file(final / "model.safetensors").keys() == load_file(toy_world / "policy" / "model.safetensors").keys()
    model = AutoModelForCausalLM.from_pretrained(final)
    assert all(type(p.data) is torch.Tensor for p in model.parameters())  # no DTensor shards left in it
    client = mlflow.MlflowClient(tracking_uri=flow_env)
    assert [p.step for p in client.get_metric_history(summary["mlflow_run_id"], "eval/win_rate")] == [2]


def test_two_machines_under_the_flow_survive_a_killed_rank_on_the_other_machine(
    flow_env, by_hand, make_flow_config, flow_workspace
):
    """Two "machines" on this one (1 process each, rendezvous on 127.0.0.1): the flow on the main
    machine, `ppoflow join --machine-rank 1` on the other, whose rank (global rank 1) is SIGKILLed
    after update 2. The main machine's launch fails, the task's retry launches again, the joiner
    (still waiting) joins it, and training resumes: weights bitwise those of 2 processes on one machine."""
    accelerate_config = flow_workspace / "two-machines.yaml"  # as `accelerate config` writes it on the main machine
    accelerate_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 0\n"
        "num_processes: 2\nmain_process_ip: 127.0.0.1\nrdzv_backend: static\nsame_network: true\n"
    )
    tree = make_flow_config("two-machines", *TWO, "flow.retries=1", f"runtime.accelerate_config={accelerate_config}")
    output_dir = Path(tree["output_dir"])
    marker = flow_workspace / "two-machines.killed"
    joiner_log = flow_workspace / "two-machines.join.log"
    with open(joiner_log, "wb") as log:
        joiner = subprocess.Popen(  # started first, as a job step on the other machine would be
            [
                sys.executable,
                "-m",
                "ppoflow.cli",
                "join",
                "--output-dir",
                str(output_dir),
                "--machine-rank",
                "1",
                "--idle-timeout",
                "600",
            ],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", KILL_RANK_ENV: f"1:2:{marker}"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    try:
        state = run_flow(tree)
        out, _ = joiner.communicate(timeout=120)
    finally:
        if joiner.poll() is None:
            os.killpg(joiner.pid, 9)
    assert joiner.returncode == 0, joiner_log.read_text()[-4000:]
    summary = state.result()
    assert marker.is_file(), "the fault was not injected"
    flow_run_id = state.state_details.flow_run_id
    assert set(stage_states(flow_run_id).values()) == {"Completed"}
    train_run = task_runs(flow_run_id)["train_ppo"]
    assert train_run.run_count == 2
    logs = task_log(train_run.id)
    assert (
        "train on 2 processes over 2 machines" in logs
        and "--num_machines 2 --mixed_precision no --dynamo_backend no" in logs
    )
    assert "--machine_rank 0 --main_process_ip 127.0.0.1" in logs
    assert "[rank 0]" in logs and "resuming from step-000002 (update 2 of 3)" in logs
    joined = json.loads(out.strip().splitlines()[-1])  # the joiner's summary: what it served
    assert [(launch["stage"], launch["returncode"] == 0) for launch in joined["launches"]] == [
        ("init_trainer", True),
        ("train", False),
        ("train", True),
    ]
    assert "[rank 1]" in joiner_log.read_text()  # global rank 1 ran on the other machine
    assert summary["updates"] == 3 and summary["episodes"] == 96
    assert_same_weights(by_hand, output_dir)
