"""The Prefect flow end to end: an embedded Prefect server, a SQLite MLflow store, the toy world.

One uninterrupted run (through the `ppoflow run` CLI) serves as the reference the others are
compared with, and no test changes its files: a re-run of it is all cached, its stage results are
JSON, a run that crashes mid-training resumes to bitwise the same policy. A run of its own has files
deleted or changed and recomputes them; a bad config fails in stage 1 at once.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from datetime import timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ppoflow.config import RunConfig
from ppoflow.errors import ConfigError, TrackingError
from ppoflow.manifests import DatasetManifest
from tests.reliability.faulty_rewards import CRASH_ENV, InjectedCrash

pytestmark = [pytest.mark.flow, pytest.mark.slow]

# The toy's oracle (logged) and a reward function that crashes once (weight 0: scores unchanged).
CRASH_REWARD = (
    "reward_functions=[{path: 'ppoflow.toy:oracle_score', name: oracle, weight: 0.0}, "
    "{path: 'tests.reliability.faulty_rewards:crash_once_after_update', weight: 0.0}]"
)

STAGES = ["configure", "load_models", "prepare_dataset", "init_trainer", "train_ppo", "save_and_evaluate"]


def run_cli(*argv: str) -> tuple[int, str]:
    from ppoflow.flows.cli import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(list(argv))
    return code, stdout.getvalue()


def run_flow(tree: dict[str, Any]):
    from ppoflow.flows.rlhf_ppo import rlhf_ppo

    return rlhf_ppo(config=RunConfig.model_validate(tree), return_state=True)


def task_runs(flow_run_id: str | UUID) -> dict[str, Any]:
    """The flow run's task runs by stage name, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(str(flow_run_id))])))
    return {run.name.split("[")[0]: run for run in runs}


def stage_states(flow_run_id: str | UUID) -> dict[str, str]:
    return {stage: run.state.name for stage, run in task_runs(flow_run_id).items()}


def flow_artifacts(flow_run_id: str | UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run_id))]))
        )


def metric_lines(output_dir: Path) -> list[str]:
    return [line for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_files(output_dir: Path, update: int, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """File -> sha256 of a checkpoint, from its manifest."""
    manifest = output_dir / "checkpoints" / f"step-{update:06d}" / "manifest.json"
    return {name: digest for name, digest in json.loads(manifest.read_text())["files"].items() if name not in skip}


def policy_tensors(policy_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(policy_dir.glob("*.safetensors")):
        tensors |= load_file(file)
    assert tensors, f"no safetensors in {policy_dir}"
    return tensors


@pytest.fixture(scope="module")
def reference(flow_env, make_flow_config, flow_workspace) -> dict[str, Any]:
    """One uninterrupted run through `ppoflow run`, evaluated after updates 2 and 3 (`ppo.eval_every`): its
    config tree and the CLI's JSON summary."""
    tree = make_flow_config("reference", "ppo.eval_every=2")
    config_file = flow_workspace / "reference.yaml"
    config_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    cli_log = logging.getLogger("ppoflow.flows.cli")
    # under pytest, the CLI's basicConfig leaves the root level alone
    level, cli_log.level = cli_log.level, logging.INFO
    cli_log.addHandler(handler)
    try:
        code, stdout = run_cli("run", "--config", str(config_file))
    finally:
        cli_log.removeHandler(handler)
        cli_log.setLevel(level)
    assert code == 0, stdout
    return {
        "tree": tree,
        "summary": json.loads(stdout.strip().splitlines()[-1]),
        "output_dir": Path(tree["output_dir"]),
        "logs": logged,
    }


def test_a_full_run_leaves_its_lineage_in_mlflow_and_prefect(reference, flow_env):
    summary, output_dir = reference["summary"], reference["output_dir"]
    assert summary["output_dir"] == str(output_dir)
    assert summary["updates"] == 3 and summary["episodes"] == 48
    assert {"reward_policy", "reward_ref", "win_rate", "kl", "oracle_policy"} <= summary["eval"].keys()
    assert summary["wall_seconds"] > 0 and "objective/scores" in summary["final_metrics"]

    client = mlflow.MlflowClient(tracking_uri=flow_env)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["ppo.learning_rate"] == "5e-05" and run.data.params["batch.num_updates"] == "3"
    assert run.data.tags["ppoflow.config_hash"] == summary["config_hash"]
    assert summary["prefect_flow_run_id"] in run.data.tags["prefect.flow_run_ids"].split(",")
    assert run.data.tags["ppoflow.policy.sha256"] and run.data.tags["ppoflow.reward.class"]
    trained_sha = run.data.tags["ppoflow.trained_policy.sha256"]
    assert len(trained_sha) == 64 and trained_sha != run.data.tags["ppoflow.policy.sha256"]
    assert summary["mlflow_experiment_id"] == run.info.experiment_id
    page = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert any(page in line for line in reference["logs"]), reference["logs"]
    for key in ("objective/scores", "objective/kl", "loss/policy_avg"):
        assert [point.step for point in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
    # eval/* are curves at the updates evaluated; stage 6's evaluation is their last point, the same numbers
    for key in ("eval/win_rate", "eval/reward_policy", "eval/kl", "eval/oracle_policy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [point.step for point in history] == [2, 3], key
        assert history[-1].value == summary["eval"][key.removeprefix("eval/")], key

    manifest = DatasetManifest.model_validate_json((output_dir / "data" / "dataset.json").read_text())
    datasets = {
        tag.value: entry.dataset
        for entry in run.inputs.dataset_inputs
        for tag in entry.tags
        if tag.key == "mlflow.data.context"
    }
    assert datasets["training"].digest == manifest.train_digest[:36]
    assert datasets["evaluation"].digest == manifest.eval_digest[:36]

    name, version = summary["registered_model"]["name"], summary["registered_model"]["version"]
    assert name == "ppoflow-flow-test-policy"
    aliased = client.get_model_version_by_alias(name, "candidate")
    assert str(aliased.version) == version and aliased.run_id == run.info.run_id
    logged = client.get_logged_model(summary["model_uri"].removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": name, "version": version}]
    assert (
        logged.params["ppoflow.trained_policy.sha256"] == trained_sha == aliased.tags["ppoflow.trained_policy.sha256"]
    )
    note = run.data.tags["mlflow.note.content"]
    for text in (
        summary["config_hash"],
        run.data.tags["ppoflow.reward.sha256"],
        manifest.train_digest,
        trained_sha,
        summary["prefect_flow_run_id"],
        f"**{name}** version **{version}**",
    ):
        assert text in note, text
    assert run.info.run_id in aliased.description and trained_sha in aliased.description
    assert client.get_registered_model(name).description
    artifacts = {
        artifact.path for folder in ("eval", "config") for artifact in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"eval/eval.json", "eval/samples.json", "config/config.yaml"} <= artifacts

    flow_run_id = summary["prefect_flow_run_id"]
    runs = task_runs(flow_run_id)
    assert sorted(runs) == sorted(STAGES)
    assert all(run.state.name == "Completed" for run in runs.values())
    assert runs["train_ppo"].name == f"train_ppo[policy-{summary['config_hash'][:8]}]"
    by_key = {artifact.key: artifact for artifact in flow_artifacts(flow_run_id)}
    assert run.info.run_id in by_key["mlflow-run"].data and "mlflow ui --backend-store-uri" in by_key["mlflow-run"].data
    for text in (
        summary["config_hash"],
        run.data.tags["ppoflow.policy.sha256"],
        manifest.train_digest,
        manifest.eval_digest,
        run.info.run_id,
        trained_sha,
    ):
        assert text in by_key["rlhf-ppo-summary"].data, text
    samples = json.loads(by_key["sample-completions"].data)
    assert len(samples) == 4
    assert list(samples[0])[:5] == ["prompt", "policy_completion", "ref_completion", "policy_score", "ref_score"]
    assert all(row["policy_score"] == float(f"{row['policy_score']:.4g}") for row in samples)
    progress = by_key["ppo-training-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.task_run_id == runs["train_ppo"].id


def test_the_same_config_again_is_all_cached_in_the_same_mlflow_run(reference, flow_env, caplog):
    caplog.set_level(logging.INFO, logger="ppoflow")
    state = run_flow(reference["tree"])
    summary = state.result()
    flow_run_id = state.state_details.flow_run_id

    assert stage_states(flow_run_id) == {stage: "Cached" for stage in STAGES}
    said = [
        record.getMessage()
        for record in caplog.records
        if record.name == "ppoflow" and "Cached, reused (" in record.getMessage()
    ]
    assert [line.split(":")[0] for line in said] == [f"[{i}/6] {stage}" for i, stage in enumerate(STAGES, 1)], said
    assert summary["mlflow_run_id"] == reference["summary"]["mlflow_run_id"]
    assert summary["registered_model"] == reference["summary"]["registered_model"]
    tags = mlflow.MlflowClient(tracking_uri=flow_env).get_run(summary["mlflow_run_id"]).data.tags
    assert {reference["summary"]["prefect_flow_run_id"], str(flow_run_id)} <= set(
        tags["prefect.flow_run_ids"].split(",")
    )


def test_stage_results_are_stored_as_json_not_pickles(reference, flow_workspace):
    records = [
        json.loads(path.read_bytes()) for path in (flow_workspace / "prefect-results").iterdir() if path.is_file()
    ]
    assert len(records) >= len(STAGES)
    assert {record["metadata"]["serializer"]["type"] for record in records} == {"json"}
    assert all(isinstance(json.loads(record["result"]), dict) for record in records)


def test_a_cached_stage_whose_files_are_gone_or_changed_runs_again(flow_env, make_flow_config):
    # A run of its own: the other tests compare with the reference's files, so those stay as they are.
    tree = make_flow_config("damaged")
    first = run_flow(tree).result()
    output_dir = Path(tree["output_dir"])
    shutil.rmtree(output_dir / "data")
    tokenizer_config = output_dir / "tokenizer" / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text() + " ")
    (output_dir / "checkpoints" / "step-000003" / "manifest.json").unlink()  # the final checkpoint, damaged

    state = run_flow(tree)

    summary = state.result()
    states = stage_states(state.state_details.flow_run_id)
    assert {stage: states[stage] for stage in STAGES[:5]} == {
        "configure": "Cached",
        "load_models": "Completed",
        "prepare_dataset": "Completed",
        "init_trainer": "Cached",
        "train_ppo": "Completed",
    }
    assert DatasetManifest.model_validate_json((output_dir / "data" / "dataset.json").read_text()).is_intact()
    # update 3 was trained again from the checkpoint of update 2 (its metrics once), to the same policy:
    # save_and_evaluate is Cached when the new checkpoint is byte-identical (rng.pt may not be, see below),
    # else it evaluates again and finds that policy already registered
    assert [json.loads(line)["update"] for line in metric_lines(output_dir)] == [1, 2, 3]
    assert summary["registered_model"] == first["registered_model"]


def test_a_new_partition_in_the_same_workspace_reruns_stages_3_to_6_as_a_new_mlflow_run(
    flow_env, make_flow_config, flow_workspace, toy_world
):
    from ppoflow.toy import add_partition

    data_root = flow_workspace / "nightly-data"  # the toy's prompts and partitions, copied: a night is added
    shutil.copytree(toy_world / "prompts", data_root / "prompts")
    shutil.copy2(toy_world / "prompts.jsonl", data_root / "prompts.jsonl")
    tree = make_flow_config(
        "nightly", f"data.path={data_root / 'prompts'}", "data.window={newest: 1}", "tracking.log_model=false"
    )
    output_dir = Path(tree["output_dir"])
    last_night = run_flow(tree).result()
    trained = metric_lines(output_dir)
    add_partition(data_root, "2026-12-02", 160, seed=1)

    state = run_flow(tree)

    tonight = state.result()
    assert stage_states(state.state_details.flow_run_id) == {
        **dict.fromkeys(STAGES[:2], "Cached"),
        **dict.fromkeys(STAGES[2:], "Completed"),
    }
    client = mlflow.MlflowClient(tracking_uri=flow_env)
    runs = {
        night: client.get_run(summary["mlflow_run_id"])
        for night, summary in (("last", last_night), ("tonight", tonight))
    }
    assert runs["tonight"].info.run_id != runs["last"].info.run_id
    assert runs["tonight"].data.tags["ppoflow.config_hash"] == runs["last"].data.tags["ppoflow.config_hash"]
    assert [json.loads(runs[night].data.tags["ppoflow.data.partitions"])[0][0] for night in runs] == [
        "prompts-2026-12-01",
        "prompts-2026-12-02",
    ]
    for run in runs.values():  # last night's run as it was, tonight's with its own updates
        assert run.info.status == "FINISHED" and [
            p.step for p in client.get_metric_history(run.info.run_id, "objective/scores")
        ] == [1, 2, 3]
    (archived,) = (output_dir / "archive").iterdir()
    assert archived.name.endswith(runs["last"].data.tags["ppoflow.training_fingerprint"][:16])
    assert metric_lines(archived) == trained and metric_lines(output_dir) != trained
    assert sorted(path.name for path in (archived / "checkpoints").iterdir()) == [
        "step-000000",
        "step-000002",
        "step-000003",
    ]
    assert {"final", "eval.json", "data"} <= {path.name for path in archived.iterdir()}

    again = run_flow(tree)  # nothing new: all cached, tonight's run
    assert stage_states(again.state_details.flow_run_id) == dict.fromkeys(STAGES, "Cached")
    assert (
        again.result()["mlflow_run_id"] == tonight["mlflow_run_id"]
        and len(list((output_dir / "archive").iterdir())) == 1
    )


def test_a_crashed_training_resumes_from_its_checkpoint_to_the_same_policy(
    reference, flow_env, make_flow_config, monkeypatch, caplog
):
    tree = make_flow_config("crashed", "flow.retries=0", "tracking.log_model=false", CRASH_REWARD)
    output_dir = Path(tree["output_dir"])
    # the rollout after update 2 (and its checkpoint) crashes, once
    monkeypatch.setenv(CRASH_ENV, f"2:{output_dir.parent / 'crashed.fault-injected'}")

    failed = run_flow(tree)

    assert failed.is_failed()
    with pytest.raises(InjectedCrash):
        failed.result()
    states = stage_states(failed.state_details.flow_run_id)
    assert states == {
        "configure": "Completed",
        "load_models": "Completed",
        "prepare_dataset": "Completed",
        "init_trainer": "Completed",
        "train_ppo": "Failed",
    }
    before = metric_lines(output_dir)
    assert [json.loads(line)["update"] for line in before] == [1, 2]
    # the failure is recorded where users look: a Prefect artifact and a tag on the (FAILED) MLflow run
    failed_id = str(failed.state_details.flow_run_id)
    (artifact,) = [item for item in flow_artifacts(failed_id) if item.key == "rlhf-ppo-failure"]
    assert "in stage `train_ppo`" in artifact.data and "InjectedCrash: " in artifact.data
    assert (
        f"prefect flow-run retry {failed_id} --entrypoint " in artifact.data
        and f"Workspace `{output_dir}`" in artifact.data
    )
    client = mlflow.MlflowClient(tracking_uri=flow_env)
    (failed_run,) = client.search_runs(
        [client.get_experiment_by_name("ppoflow-flow-test").experiment_id],
        filter_string=f"tags.`prefect.last_flow_run_id` = '{failed_id}'",
    )
    assert failed_run.info.status == "FAILED" and failed_run.data.tags["ppoflow.failed_stage"] == "train_ppo"
    assert (
        failed_run.data.tags["ppoflow.failure"].startswith("InjectedCrash: ")
        and "\n" not in failed_run.data.tags["ppoflow.failure"]
    )

    caplog.set_level(logging.INFO, logger="ppoflow")
    resumed = run_flow(tree)

    summary = resumed.result()
    assert stage_states(resumed.state_details.flow_run_id) == {
        "configure": "Cached",
        "load_models": "Cached",
        "prepare_dataset": "Cached",
        "init_trainer": "Cached",
        "train_ppo": "Completed",
        "save_and_evaluate": "Completed",
    }
    assert "resuming from step-000002 (update 2 of 3)" in caplog.text
    after = metric_lines(output_dir)
    assert after[:2] == before and json.loads(after[2])["update"] == 3  # updates 1-2 were not trained again

    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_id == failed_run.info.run_id
    assert "ppoflow.failure" not in run.data.tags and "ppoflow.failed_stage" not in run.data.tags  # the job got through
    flow_runs = set(run.data.tags["prefect.flow_run_ids"].split(","))
    assert {str(failed.state_details.flow_run_id), str(resumed.state_details.flow_run_id)} <= flow_runs
    assert [point.step for point in client.get_metric_history(run.info.run_id, "objective/scores")] == [1, 2, 3]

    # trained with evaluations in between, this run without
    expected = policy_tensors(reference["output_dir"] / "final")
    actual = policy_tensors(output_dir / "final")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    # value model, optimizer and scheduler too; state.json names the config hash (another output_dir) and
    # rng.pt holds Python's process-wide `random` state, which other threads of the process may draw from
    skip = ("state.json", "rng.pt")
    expected_files = checkpoint_files(reference["output_dir"], update=3, skip=skip)
    assert checkpoint_files(output_dir, update=3, skip=skip) == expected_files and "optimizer.pt" in expected_files


def test_a_bad_config_fails_in_stage_one_without_retries(flow_env, make_flow_config, flow_workspace, capsys):
    from prefect.client.orchestration import get_client

    tree = make_flow_config("bad", "ppo.num_mini_batches=3")  # does not divide the rollout batch of 16
    tree["output_dir"] = str(flow_workspace / "bad-{date}" / "{flow_run}")

    state = run_flow(tree)

    assert state.is_failed()
    with pytest.raises(ConfigError, match="config field `ppo.num_mini_batches`"):
        state.result()
    runs = task_runs(state.state_details.flow_run_id)
    assert list(runs) == ["configure"]
    assert runs["configure"].state.is_failed() and runs["configure"].run_count == 1  # retries: 2, none used
    assert "ppo.num_mini_batches" in runs["configure"].state.message
    # output_dir's placeholders: the UTC day it was scheduled for and the flow run's id; the flow run is
    # named from the expanded config, as its stages are
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    workspace = (
        flow_workspace / f"bad-{flow_run.expected_start_time.astimezone(timezone.utc):%Y-%m-%d}" / str(flow_run.id)
    )
    (artifact,) = [item for item in flow_artifacts(flow_run.id) if item.key == "rlhf-ppo-failure"]
    assert f"Workspace `{workspace}`" in artifact.data and "in stage `configure`" in artifact.data
    assert "ConfigError: config field `ppo.num_mini_batches`" in artifact.data
    assert runs["configure"].name == f"configure[{flow_run.name}]"

    config_file = flow_workspace / "typo.yaml"
    config_file.write_text(yaml.safe_dump(make_flow_config("typo"), sort_keys=False))
    code, stdout = run_cli("run", "--config", str(config_file), "--set", "ppo.learning_rat=1e-5")
    assert code == 2 and stdout == ""
    assert "config field `ppo.learning_rat`: is not a known setting" in capsys.readouterr().err


def test_transient_failures_are_retried_and_user_errors_are_not(flow_env):
    from prefect import flow, task

    from ppoflow.tasks.common import retry_unless_user_error

    attempts: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_user_error)
    def fails_once(error: Exception) -> str:
        attempts.append(type(error).__name__)
        if attempts.count(type(error).__name__) == 1:
            raise error
        return "done"

    @flow
    def both() -> list[Any]:
        crash = fails_once(InjectedCrash("crash"), return_state=True)
        user_error = fails_once(ConfigError("ppo.seed", "is wrong"), return_state=True)
        return [crash, user_error]

    crash, user_error = both()
    assert crash.is_completed() and user_error.is_failed()
    assert attempts == ["InjectedCrash", "InjectedCrash", "ConfigError"]


def test_stage_retries_back_off_and_record_a_number_the_ui_can_show(flow_env):
    """`flow.retry_delay_seconds` as a backoff: retry N waits delay N, and the task run's recorded
    `retry_delay` is a number (a list reads "Retry Delay NaNs" on Prefect's task run page)."""
    import time

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from ppoflow.config import FlowConfig
    from ppoflow.tasks.common import flow_options

    options = flow_options(FlowConfig(retries=2, retry_delay_seconds=[0.3, 1.2]))
    attempts: list[float] = []

    @task
    def fails_twice() -> int:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise InjectedCrash("transient")
        return len(attempts)

    @flow
    def retried():
        return fails_twice.with_options(retries=options["retries"], retry_delay_seconds=options["retry_delay_seconds"])(
            return_state=True
        )

    state = retried()
    assert state.is_completed()
    first_wait, second_wait = attempts[1] - attempts[0], attempts[2] - attempts[1]
    assert 0.3 <= first_wait < 1.2 <= second_wait
    deadline = time.monotonic() + 20  # task runs are recorded from events, a moment later
    with get_client(sync_client=True) as client:
        while True:
            with contextlib.suppress(ObjectNotFound):
                recorded = client.read_task_run(state.state_details.task_run_id)
                if recorded.state is not None and recorded.state.is_completed():
                    break
            assert time.monotonic() < deadline, "the task run was not recorded"
            time.sleep(0.2)
    assert (recorded.empirical_policy.retries, recorded.empirical_policy.retry_delay) == (2, 0.3)
    assert isinstance(recorded.empirical_policy.retry_delay, float)


def test_an_unreachable_tracking_server_stops_the_flow_before_any_stage(
    flow_env, make_flow_config, closed_port, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port}")

    state = run_flow(make_flow_config("unreachable"))

    with pytest.raises(TrackingError, match="does not answer"):
        state.result()
    assert task_runs(state.state_details.flow_run_id) == {}
