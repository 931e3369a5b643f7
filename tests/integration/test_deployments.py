"""The deployments of deployments/prefect.yaml on real servers, as `make serve` brings them up.

One stack for the module (`served_stack`: Prefect server, MLflow server with basic auth, the
`ppoflow` work pool, `prefect deploy`, a process worker). Two tiny toy trainings are triggered
through the API at the same moment, both on the `toy-nightly` deployment with `overrides`:

- "good", the first night of the nightly chain (no @champion yet: from the SFT model), runs through
  and must land in MLflow with its metrics, datasets and registered model version, tagged with its
  Prefect flow run id;
- "fault" adds a reward function that crashes once (`tests.reliability.faulty_rewards`), with
  `PPOFLOW_TEST_CRASH_AFTER=1:...` as a job variable and `flow.retries=0`, so it fails after the
  first PPO update; `prefect flow-run retry` then completes the same flow run with
  stages 1-4 `Cached` and training resumed from its checkpoint.

A second worker polls the pool meanwhile: the pool's concurrency limit, not the luck of a single
worker, must keep the two trainings apart. Then two more nights of the chain follow, each after a
new dated partition landed: night 2 continues from @champion and is decided by the gate; night 3
(the SFT model, barely trained) cannot beat the champion and is rejected. About 6-7 minutes on 2
cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from ppoflow.deployments import serve
from ppoflow.deployments.steps import load_run_config
from ppoflow.workspace import METRICS_FILE
from tests.deployment_files import config_file, declared
from tests.reliability.faulty_rewards import CRASH_ENV

pytestmark = pytest.mark.integration

STAGES = ["configure", "load_models", "prepare_dataset", "init_trainer", "train_ppo", "save_and_evaluate"]
CACHED_ON_RETRY = STAGES[:4]
SFT_NIGHTLY = "sft-nightly"  # the workspace the chain's nights 3 and 4 share
EXPERIMENT = "deploy-test"
REGISTERED_MODEL = "deploy-test-policy"
CHAIN_MODEL = "deploy-chain-policy"  # the nightly chain's registered model
RUN_TIMEOUT = 420.0
# For the tests that ask for `triggered`: whichever runs first pays for both trainings through the
# worker (~2.5 min on 2 quiet cores, after the stack's ~45 s). The default timeout is in pyproject.toml.
TRIGGERED_TIMEOUT = pytest.mark.timeout(1200)


def tiny_overrides(toy: Path, workspace: Path, name: str) -> list[str]:
    """The toy-nightly config shrunk to three PPO updates of 16 prompts from the SFT model on the toy's
    prompts file, in its own workspace."""
    return [
        f"models.policy={toy / 'policy'}",
        "models.policy_fallback=null",
        f"models.ref={toy / 'policy'}",
        f"models.reward={toy / 'reward'}",
        f"data.path={toy / 'prompts.jsonl'}",
        "data.window=null",
        "data.eval_size=16",
        f"output_dir={workspace / name}",
        "ppo.total_episodes=48",
        "ppo.per_device_train_batch_size=16",
        "ppo.gradient_accumulation_steps=1",
        "ppo.num_mini_batches=1",
        "ppo.num_ppo_epochs=1",
        "ppo.local_rollout_forward_batch_size=16",
        "ppo.response_length=16",
        "ppo.checkpoint_every=1",
        "eval.batch_size=16",
        "eval.sample_table_size=4",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.registered_model_name={REGISTERED_MODEL}",
        "tracking.system_metrics=false",
        f"flow.result_storage={workspace / 'prefect-results'}",
        "flow.retry_delay_seconds=[0]",
    ]


def chain_overrides(toy: Path, partitions: Path, workspace: Path) -> list[str]:
    """toy-nightly as deployed (from @champion, the SFT model while there is none, on the newest
    partition) shrunk to four PPO updates of 16 prompts at a learning rate that moves the toy policy
    within them, into its own registered model, in a workspace per flow run."""
    return [
        f"models.policy=models:/{CHAIN_MODEL}@champion",
        f"models.policy_fallback={toy / 'policy'}",
        f"models.ref={toy / 'policy'}",
        f"models.reward={toy / 'reward'}",
        f"data.path={partitions}",
        "data.eval_size=32",
        f"output_dir={workspace / 'nights'}/{{flow_run}}",
        "ppo.total_episodes=64",
        "ppo.per_device_train_batch_size=16",
        "ppo.gradient_accumulation_steps=1",
        "ppo.num_mini_batches=1",
        "ppo.num_ppo_epochs=2",
        "ppo.local_rollout_forward_batch_size=16",
        "ppo.response_length=16",
        "ppo.learning_rate=5e-4",
        "ppo.checkpoint_every=2",
        "eval.batch_size=32",
        "eval.sample_table_size=4",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.registered_model_name={CHAIN_MODEL}",
        "tracking.system_metrics=false",
        f"flow.result_storage={workspace / 'prefect-results'}",
        "flow.retry_delay_seconds=[1, 5]",  # a backoff: the task run page must show its first delay
    ]


def prefect_client(stack: serve.Stack):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(stack.api_url)


def wait_until(client, flow_run_id: UUID, reached, timeout: float = RUN_TIMEOUT):
    """The flow run once `reached(its state)`; a test failure after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state is not None and reached(flow_run.state):
            return flow_run
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {flow_run_id} still {flow_run.state_name} after {timeout:.0f} s")
        time.sleep(1.0)


def wait_final(client, flow_run_id: UUID, timeout: float = RUN_TIMEOUT):
    return wait_until(client, flow_run_id, lambda state: state.is_final(), timeout)


def latest_task_runs(client, flow_run_id: UUID) -> dict[str, Any]:
    """The newest task run of each stage of a flow run (a retried flow run has one per attempt)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    latest: dict[str, Any] = {}
    for run in sorted(runs, key=lambda run: run.start_time or run.expected_start_time):
        latest[run.name.split("[")[0]] = run
    return latest


def busy_intervals(client, flow_run_id: UUID) -> list[tuple[datetime, datetime]]:
    """[Pending, end) of each attempt of a flow run: when it held a slot of the pool."""
    states = sorted(client.read_flow_run_states(flow_run_id), key=lambda state: state.timestamp)
    intervals, began = [], None
    for state in states:
        if state.type.value in ("PENDING", "RUNNING") and began is None:
            began = state.timestamp
        elif state.is_final() and began is not None:
            intervals.append((began, state.timestamp))
            began = None
    return intervals


def mlflow_run_of(stack: serve.Stack, flow_run_id: UUID):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no MLflow experiment {EXPERIMENT!r} on {stack.mlflow_url}"
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`prefect.flow_run.{flow_run_id}` LIKE '%'"
    )
    assert len(runs) == 1, f"{len(runs)} MLflow runs tagged with flow run {flow_run_id}"
    return client, runs[0]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy-runs")


@pytest.fixture(scope="module")
def served_deployments(served_stack) -> dict[str, Any]:
    """Each deployment as the server holds it after `prefect deploy`, by name: read before any test
    changes one (the scheduler test switches the nightly's schedule off)."""
    with prefect_client(served_stack) as client:
        return {name: client.read_deployment_by_name(f"rlhf-ppo/{name}") for name in declared()}


@pytest.fixture(scope="module")
def second_worker(served_stack):
    """Another worker on the same pool, as someone might start by accident on this machine (not waited
    for: it comes online while the first training runs)."""
    home = Path(served_stack.home)
    since = datetime.now(timezone.utc)
    env = serve.worker_environment(served_stack, {"PREFECT_WORKER_QUERY_SECONDS": "1"})
    proc = serve.start_worker(home, env, name="second-worker")
    served_stack.processes["second-worker"] = proc  # so `serve.stop` ends it too
    serve.write_stack(served_stack)
    return proc, since


@pytest.fixture(scope="module")
def partitions(toy_world, workspace) -> Path:
    """The toy's prompts and dated partitions, copied: the chain's nights add partitions to them."""
    root = workspace / "chain-data"
    (root / "prompts").mkdir(parents=True)
    shutil.copy2(toy_world / "prompts.jsonl", root / "prompts.jsonl")
    for partition in (toy_world / "prompts").glob("prompts-*.jsonl"):
        shutil.copy2(partition, root / "prompts" / partition.name)
    return root / "prompts"


@pytest.fixture(scope="module")
def triggered(served_stack, second_worker, toy_world, workspace, partitions) -> dict[str, Any]:
    """Both trainings triggered at once through the API; returns their final flow runs. "good" is the
    first night of the nightly chain."""
    with prefect_client(served_stack) as client:
        deployment = client.read_deployment_by_name("rlhf-ppo/toy-nightly")
        good = client.create_flow_run_from_deployment(
            deployment.id, parameters={"overrides": chain_overrides(toy_world, partitions, workspace)}
        )
        crash = (
            "reward_functions=[{path: 'ppoflow.toy:oracle_score', name: oracle, weight: 0.0}, "
            "{path: 'tests.reliability.faulty_rewards:crash_once_after_update', weight: 0.0}]"
        )
        fault = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={"overrides": [*tiny_overrides(toy_world, workspace, "fault"), "flow.retries=0", crash]},
            job_variables={"env": {CRASH_ENV: f"1:{workspace / 'fault' / '.fault-injected-1'}"}},
        )
        return {"good": wait_final(client, good.id), "fault": wait_final(client, fault.id)}


# --------------------------------------------------------------------------- the declaration, deployed
# (the files themselves: tests/unit/test_servers.py)


def test_deployments_on_the_server_are_what_the_file_says(served_stack, served_deployments):
    from prefect.client.schemas.objects import WorkPoolStatus

    with prefect_client(served_stack) as client:
        pool = client.read_work_pool(serve.WORK_POOL)
        assert (pool.type, pool.concurrency_limit, pool.status) == ("process", 1, WorkPoolStatus.READY)
    for name, spec in declared().items():
        deployment = served_deployments[name]
        assert deployment.work_pool_name == serve.WORK_POOL
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(serve.REPO_ROOT)}}
        ]
        assert deployment.parameters == {"config": load_run_config(str(config_file(spec)))["config"], "overrides": []}
        assert deployment.job_variables == spec["work_pool"]["job_variables"]
        assert deployment.enforce_parameter_schema
        assert not deployment.paused
        schedules = [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules]
        assert schedules == [(s["cron"], s["timezone"], s["active"]) for s in spec["schedules"]]
    assert [s for s in declared()["toy-nightly"]["schedules"]] == [
        {"cron": "0 2 * * *", "timezone": "UTC", "active": True}
    ]
    assert not any(s["active"] for s in declared()["my-model"]["schedules"])


def test_scheduler_plans_the_nightly_at_two_utc(served_stack, served_deployments):
    """The server's scheduler turns the cron into Scheduled runs at 02:00 UTC on the coming nights."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound

    deployment = served_deployments["toy-nightly"]
    with prefect_client(served_stack) as client:
        deadline = time.monotonic() + 20
        while True:
            planned = [
                run
                for run in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                )
                if run.auto_scheduled
            ]
            if planned or time.monotonic() > deadline:
                break
            time.sleep(1)
        try:
            times = sorted(run.expected_start_time.astimezone(timezone.utc) for run in planned)
            assert times, "the scheduler created no run for toy-nightly"
            now = datetime.now(timezone.utc)
            assert all((t.hour, t.minute, t.second) == (2, 0, 0) for t in times)
            assert now < times[0] <= now + timedelta(days=1)
            assert all(b - a == timedelta(days=1) for a, b in zip(times, times[1:], strict=False))
        finally:  # no 02:00 run may start while the other tests use the pool
            for schedule in deployment.schedules:
                client.update_deployment_schedule(deployment.id, schedule.id, active=False)  # drops its planned runs
            for run in planned:
                with contextlib.suppress(ObjectNotFound):
                    client.delete_flow_run(run.id)


# --------------------------------------------------------------------------- runs through the worker


@TRIGGERED_TIMEOUT
def test_toy_run_lands_in_mlflow_with_its_prefect_lineage(served_stack, triggered, workspace):
    good = triggered["good"]
    assert good.state.is_completed(), f"good run ended {good.state_name}: {good.state.message}"
    assert good.parameters["overrides"][-1] == "flow.retry_delay_seconds=[1, 5]"
    client, run = mlflow_run_of(served_stack, good.id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.last_flow_run_id"] == str(good.id)
    about = json.loads(run.data.tags[f"prefect.flow_run.{good.id}"])
    assert (about["deployment"], about["url"]) == (
        "toy-nightly",
        f"{served_stack.prefect_url}/flow-runs/flow-run/{good.id}",
    )
    assert run.data.params["output_dir"] == str(workspace / "nights" / str(good.id))  # {flow_run} expanded
    assert [m.step for m in client.get_metric_history(run.info.run_id, "objective/kl")] == [1, 2, 3, 4]
    assert {"eval/reward_policy", "eval/oracle_policy", "loss/policy_avg"} <= set(run.data.metrics)
    contexts = {
        tag.value for entry in run.inputs.dataset_inputs for tag in entry.tags if tag.key == "mlflow.data.context"
    }
    assert contexts == {"training", "evaluation", "partition"}
    versions = [v for v in client.search_model_versions(f"name='{CHAIN_MODEL}'") if v.run_id == run.info.run_id]
    assert len(versions) == 1 and versions[0].status == "READY"

    with prefect_client(served_stack) as prefect:
        artifacts = {a.key: a for a in prefect.read_artifacts() if a.flow_run_id == good.id}
    page = (
        f"{served_stack.mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        "?workflowType=machine_learning"
    )
    assert f"({page})" in artifacts["mlflow-run"].data  # a markdown link to the run's page
    assert {"rlhf-ppo-summary", "sample-completions"} <= set(artifacts)


@TRIGGERED_TIMEOUT
def test_two_trainings_never_share_the_pool(served_stack, second_worker, triggered):
    proc, since = second_worker
    serve.wait_worker_online(served_stack.api_url, proc, since, timeout=10, name="second-worker")
    with prefect_client(served_stack) as client:
        good = busy_intervals(client, triggered["good"].id)
        fault = busy_intervals(client, triggered["fault"].id)
    assert len(good) == 1 and len(fault) == 1
    (a_start, a_end), (b_start, b_end) = sorted([good[0], fault[0]])
    assert a_end <= b_start, f"runs overlapped on the pool: {a_start}-{a_end} and {b_start}-{b_end}"


@TRIGGERED_TIMEOUT
def test_failed_run_retried_keeps_stages_1_to_4_cached(served_stack, triggered, workspace):
    fault = triggered["fault"]
    assert fault.state.is_failed(), f"fault run ended {fault.state_name}"
    output_dir = workspace / "fault"
    assert (output_dir / ".fault-injected-1").exists()
    metrics_before = (output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["update"] for line in metrics_before] == [1]

    # Exactly what a user types (the UI's "Retry" does the same): the flow run goes back to Scheduled.
    env = {**os.environ, **serve.prefect_env(Path(served_stack.home)), "PREFECT_API_URL": served_stack.api_url}
    retry = subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", str(fault.id)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert retry.returncode == 0, retry.stdout + retry.stderr

    with prefect_client(served_stack) as client:
        retried = wait_final(client, fault.id)
        assert retried.state.is_completed(), f"retried run ended {retried.state_name}: {retried.state.message}"
        assert retried.id == fault.id and retried.run_count == 2
        states = {stage: run.state.name for stage, run in latest_task_runs(client, fault.id).items()}
    assert states == {
        **dict.fromkeys(CACHED_ON_RETRY, "Cached"),
        "train_ppo": "Completed",
        "save_and_evaluate": "Completed",
    }

    # Training resumed after update 1 (its metrics line kept verbatim) instead of starting over.
    metrics_after = (output_dir / "metrics.jsonl").read_text().splitlines()
    assert metrics_after[0] == metrics_before[0]
    assert [json.loads(line)["update"] for line in metrics_after] == [1, 2, 3]

    # One MLflow run for the job, continued by the second attempt: each update logged once, one model version.
    client, run = mlflow_run_of(served_stack, fault.id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "objective/kl")] == [1, 2, 3]
    assert (
        len([v for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'") if v.run_id == run.info.run_id]) == 1
    )


@pytest.fixture(scope="module")
def chain(served_stack, triggered, toy_world, workspace, partitions) -> dict[str, Any]:
    """Nights 2 to 4 of the chain, one after the other through the deployment, each after a new
    partition landed: night 2 continues from @champion as deployed; nights 3 and 4 cannot beat the
    champion (the SFT model, barely trained) and share one fixed workspace, so night 4 is the same
    config on a new partition."""
    from ppoflow.toy import add_partition

    from_sft = [
        f"models.policy={toy_world / 'policy'}",
        "models.policy_fallback=null",
        "ppo.learning_rate=1e-9",
        "ppo.total_episodes=32",
        f"output_dir={workspace / SFT_NIGHTLY}",
    ]
    nights = {"night 1": triggered["good"]}
    with prefect_client(served_stack) as client:
        deployment = client.read_deployment_by_name("rlhf-ppo/toy-nightly")
        for night, date, extra in (
            ("night 2", "2026-12-02", []),
            ("night 3", "2026-12-03", from_sft),
            ("night 4", "2026-12-04", from_sft),
        ):
            add_partition(partitions.parent, date, 160, seed=len(nights))
            overrides = [*chain_overrides(toy_world, partitions, workspace), *extra]
            flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": overrides})
            nights[night] = wait_final(client, flow_run.id)
    return nights


@TRIGGERED_TIMEOUT
def test_nightly_runs_chain_through_the_registry_and_promote_only_through_the_gate(
    served_stack, chain, toy_world, workspace
):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=served_stack.mlflow_url)
    runs, versions = {}, {}
    for night, flow_run in chain.items():
        assert flow_run.state.is_completed(), f"{night} ended {flow_run.state_name}: {flow_run.state.message}"
        _, runs[night] = mlflow_run_of(served_stack, flow_run.id)
        (versions[night],) = [
            v for v in client.search_model_versions(f"name='{CHAIN_MODEL}'") if v.run_id == runs[night].info.run_id
        ]
    number = {night: str(version.version) for night, version in versions.items()}
    assert sorted(number.values()) == ["1", "2", "3", "4"]
    decisions = {night: versions[night].tags["ppoflow.promotion"] for night in chain}

    # night 1: no champion yet, so it started from the SFT model and was judged against the reference
    assert versions["night 1"].tags["ppoflow.policy_source"] == str(toy_world / "policy")
    assert decisions["night 1"].startswith("promoted: win rate ") and decisions["night 1"].endswith(
        " against the reference"
    )

    # night 2: from the champion (version 1), recorded as its parent, on the partition that landed before it
    assert runs["night 2"].data.tags["ppoflow.policy.registry_version"] == f"models:/{CHAIN_MODEL}/{number['night 1']}"
    assert versions["night 2"].tags["ppoflow.policy_source"] == f"models:/{CHAIN_MODEL}/{number['night 1']}"
    read = json.loads(runs["night 2"].data.tags["ppoflow.data.partitions"])
    assert [stem for stem, _ in read] == ["prompts-2026-12-02"]  # window {newest: 1}
    assert {entry.dataset.name for entry in runs["night 2"].inputs.dataset_inputs} >= {"prompts-2026-12-02"}
    assert decisions["night 2"].endswith(f" against models:/{CHAIN_MODEL}/{number['night 1']}")
    champion_after_2 = number["night 2"] if decisions["night 2"].startswith("promoted: ") else number["night 1"]

    # night 3 cannot beat the champion: rejected, the alias stays where it was, the decision is everywhere
    assert decisions["night 3"].startswith("rejected: win rate ") and decisions["night 3"].endswith(
        f" against models:/{CHAIN_MODEL}/{champion_after_2}"
    )
    assert runs["night 3"].data.tags["ppoflow.promotion"] == decisions["night 3"]
    report = json.loads(Path(client.download_artifacts(runs["night 3"].info.run_id, "eval/eval.json")).read_text())
    assert report["promotion"]["promoted"] is False and report["promotion"]["decision"] == decisions["night 3"]
    with prefect_client(served_stack) as prefect:
        (summary,) = [
            a for a in prefect.read_artifacts() if a.flow_run_id == chain["night 3"].id and a.key == "rlhf-ppo-summary"
        ]
        night_4_stages = {
            stage: run.state.name for stage, run in latest_task_runs(prefect, chain["night 4"].id).items()
        }
    assert decisions["night 3"] in summary.data

    # night 4: night 3's config in night 3's workspace on a new partition: stages 1-2 Cached, 3-6 run as a
    # new MLflow run (night 3's stays as it was), night 3's training archived whole, rejected as well
    assert night_4_stages == {**dict.fromkeys(STAGES[:2], "Cached"), **dict.fromkeys(STAGES[2:], "Completed")}
    assert runs["night 4"].info.run_id != runs["night 3"].info.run_id and runs["night 3"].info.status == "FINISHED"
    assert runs["night 4"].data.tags["ppoflow.config_hash"] == runs["night 3"].data.tags["ppoflow.config_hash"]
    assert (
        runs["night 4"].data.tags["ppoflow.training_fingerprint"]
        != runs["night 3"].data.tags["ppoflow.training_fingerprint"]
    )
    assert [stem for stem, _ in json.loads(runs["night 4"].data.tags["ppoflow.data.partitions"])] == [
        "prompts-2026-12-04"
    ]
    (archived,) = (workspace / SFT_NIGHTLY / "archive").iterdir()
    assert archived.name.endswith(runs["night 3"].data.tags["ppoflow.training_fingerprint"][:16])
    assert {path.name for path in (archived / "checkpoints").iterdir()} == {"step-000000", "step-000002"}
    assert json.loads((archived / "eval.json").read_text())["promotion"]["decision"] == decisions["night 3"]
    assert decisions["night 4"].startswith("rejected: ")
    assert str(client.get_model_version_by_alias(CHAIN_MODEL, "champion").version) == champion_after_2
    assert str(client.get_model_version_by_alias(CHAIN_MODEL, "candidate").version) == number["night 4"]


def wait_for_alerts(receiver, count: int, timeout: float = 90.0) -> list[dict]:
    """The receiver's messages once it has `count` (the automations act a few seconds after the event)."""
    deadline = time.monotonic() + timeout
    while len(receiver.received) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5.0)  # and any message more, which would be one too many
    return list(receiver.received)


@TRIGGERED_TIMEOUT
def test_alerts_reach_the_webhook_for_a_failed_night_and_each_rejected_candidate(
    served_stack, alert_receiver, triggered, chain
):
    """`--alert-webhook` (make serve ALERT_WEBHOOK=...): the Custom Webhook block and the automations
    POST one message when a night fails (naming its stage and error, linking its flow run and MLflow
    run) and one per rejected candidate (the gate's reason); none for a promoted one."""
    import mlflow

    assert served_stack.alerts == [
        "ppoflow: a night failed",
        "ppoflow: a night crashed",
        "ppoflow: a candidate was rejected",
        "ppoflow: a candidate awaits approval",
    ]
    client = mlflow.MlflowClient(tracking_uri=served_stack.mlflow_url)
    rejected = {}  # every registered version the gate rejected: the chain's, and the fault run's once retried
    for night, flow_run in {"fault": triggered["fault"], **chain}.items():
        _, run = mlflow_run_of(served_stack, flow_run.id)
        for model in (REGISTERED_MODEL, CHAIN_MODEL):
            for version in client.search_model_versions(f"name='{model}'"):
                decision = version.tags.get("ppoflow.promotion", "")
                if version.run_id == run.info.run_id and decision.startswith("rejected: "):
                    rejected[night] = (model, version, run, flow_run)
    assert {"night 3", "night 4"} <= set(rejected)
    messages = wait_for_alerts(alert_receiver, 1 + len(rejected))
    by_subject = {message["subject"]: message["body"] for message in messages}
    shown = json.dumps(messages, indent=1)
    assert len(by_subject) == len(messages) == 1 + len(rejected), shown  # one message each, nothing else

    fault = triggered["fault"]
    body = by_subject[f"ppoflow: night {fault.name} failed"]
    _, fault_run = mlflow_run_of(served_stack, fault.id)
    assert body.startswith(f"ppoflow night {fault.name} failed in train_ppo: "), body
    assert "crash injected after update 1" in body, body
    assert f"Flow run: {served_stack.prefect_url}/flow-runs/flow-run/{fault.id}" in body
    assert f"MLflow run: {served_stack.mlflow_url}/#/experiments/{fault_run.info.experiment_id}/runs/" in body

    for night, (model, version, run, flow_run) in rejected.items():
        body = by_subject[f"ppoflow: {model} version {version.version} rejected"]
        assert f"did not take @champion — {version.tags['ppoflow.promotion']}" in body, (night, body)
        assert f"Flow run: {served_stack.prefect_url}/flow-runs/flow-run/{flow_run.id}" in body
        assert f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in body


def test_a_crashed_night_alerts_with_its_state_message(served_stack, alert_receiver, served_deployments):
    """A night whose process was killed outright runs no hook: the alert comes from Prefect's own
    `prefect.flow-run.Crashed` event, with the state's message and the flow run's page. (The run here
    is scheduled a day ahead, so no worker takes it, and then marked Crashed as the worker marks one.)"""
    from prefect.states import Crashed, Scheduled

    seen = len(alert_receiver.received)
    with prefect_client(served_stack) as client:
        deployment = client.read_deployment_by_name("rlhf-ppo/toy-nightly")
        later = Scheduled(scheduled_time=datetime.now(timezone.utc) + timedelta(days=1))
        flow_run = client.create_flow_run_from_deployment(deployment.id, state=later)
        killed = Crashed(message="Flow run infrastructure exited with code -9.")
        client.set_flow_run_state(flow_run.id, killed, force=True)
    messages = wait_for_alerts(alert_receiver, seen + 1)[seen:]
    assert messages == [
        {
            "subject": f"ppoflow: night {flow_run.name} crashed",
            "body": f"ppoflow night {flow_run.name} crashed: Flow run infrastructure exited with code -9.\n"
            f"Flow run: {served_stack.prefect_url}/runs/flow-run/{flow_run.id}",
        }
    ]


def processes_of(workspace: Path) -> list:
    """The live processes whose command line names `workspace`: accelerate's launcher and its ranks
    (`ppoflow.cli stage train --inputs WORKSPACE/launch/...`)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if (
                any(str(workspace) in part for part in process.info["cmdline"] or ())
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(process)
    return found


@TRIGGERED_TIMEOUT
def test_cancelling_a_two_process_training_ends_every_rank(served_stack, chain, toy_world, workspace):
    """Cancelling a flow run (the UI's Cancel sets the state this test sets through the API) while its
    training runs on two processes: the worker ends the flow run's process, which ends the accelerate
    launch group it started in a session of its own; no rank is left holding its cores or GPU."""
    import psutil
    from prefect.states import Cancelling

    output_dir = workspace / "cancelled"
    overrides = [
        *tiny_overrides(toy_world, workspace, "cancelled"),
        "runtime.num_processes=2",
        "ppo.total_episodes=9600",
        "ppo.checkpoint_every=1000",
        "flow.retries=0",
    ]
    with prefect_client(served_stack) as client:
        deployment = client.read_deployment_by_name("rlhf-ppo/toy-nightly")
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": overrides})
        deadline = time.monotonic() + 300
        while not (output_dir / METRICS_FILE).is_file():  # both ranks past their first update
            assert time.monotonic() < deadline, f"no update trained in {output_dir} after 300 s"
            time.sleep(0.5)
        ranks = [p for p in processes_of(output_dir) if "ppoflow.cli" in " ".join(p.cmdline())]
        assert len(ranks) >= 2, [p.cmdline() for p in ranks]
        began = time.monotonic()
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        final = wait_final(client, flow_run.id)
    _, alive = psutil.wait_procs(processes_of(output_dir), timeout=60)
    assert not alive, f"left running {time.monotonic() - began:.0f} s after the cancel: {[p.cmdline() for p in alive]}"
    assert final.state.is_cancelled(), f"ended {final.state_name}: {final.state.message}"
    assert len(read_jsonl_lines(output_dir / METRICS_FILE)) < 300  # stopped long before its 300 updates


def read_jsonl_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


@TRIGGERED_TIMEOUT
def test_mlflow_refuses_clients_without_credentials(served_stack, triggered):
    """Basic auth is on: the worker's runs got in with its credentials; an anonymous request does not."""
    url = f"{served_stack.mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(url, timeout=10)
    assert refused.value.code == 401
    assert triggered["good"].state.is_completed()
    import mlflow

    assert mlflow.MlflowClient(tracking_uri=served_stack.mlflow_url).get_experiment_by_name(EXPERIMENT) is not None


# --------------------------------------------------------------------------- what a person sees (the ui tier)
# Chromium (Debian's package, never a browser Playwright downloads) through the stack's two UIs, on the
# night-1 run above: no stack or training of their own. Each page is asserted by what it shows, waiting
# for content, not for time. Screenshots land in the session's `screenshots/` directory; `make
# screenshots` copies three of them into docs/screenshots/ for the README.

CHROMIUM = Path("/usr/bin/chromium")
PAGE_TIMEOUT_MS = 60_000  # a React page takes 5-15 s to fill on 2 busy cores
VIEWPORT = {"width": 1400, "height": 1000}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots", numbered=False)


@pytest.fixture(scope="module")
def browser(served_stack):
    """One headless Chromium for the module, logged in to MLflow (basic auth) as the worker is."""
    from playwright.sync_api import expect, sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail(
            f"no {CHROMIUM}: install Debian's browser (apt-get install -y "
            "chromium), as make test does as root (.ci/system-packages)"
        )
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        context = chromium.new_context(
            viewport=VIEWPORT,
            http_credentials={
                "username": os.environ["MLFLOW_TRACKING_USERNAME"],
                "password": os.environ["MLFLOW_TRACKING_PASSWORD"],
            },
        )
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            yield context
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def night_one(served_stack, triggered) -> dict[str, Any]:
    """The night-1 run as the UIs should show it: its flow run, MLflow run, registered version, logged model."""
    good = triggered["good"]
    assert good.state.is_completed(), f"good run ended {good.state_name}: {good.state.message}"
    client, run = mlflow_run_of(served_stack, good.id)
    name, _, version = run.data.tags["ppoflow.registered_model"].partition("/")
    datasets = {
        tag.value: entry.dataset
        for entry in run.inputs.dataset_inputs
        for tag in entry.tags
        if tag.key == "mlflow.data.context"
    }
    return {
        "flow_run": good,
        "run": run,
        "registered_model": name,
        "version": version,
        "datasets": datasets,
        "model_id": run.data.tags["ppoflow.model_uri"].removeprefix("models:/"),
    }


def clip_between(page, top, bottom, margin: int = 12) -> dict[str, float]:
    """The band of the page from locator `top` to locator `bottom`, from `top`'s left edge to the right
    (the navigation column left out): a small PNG of what matters."""
    first, last = top.bounding_box(), bottom.bounding_box()
    x, y = max(first["x"] - margin, 0), max(first["y"] - margin, 0)
    return {"x": x, "y": y, "width": page.viewport_size["width"] - x, "height": last["y"] + last["height"] + margin - y}


def open_mlflow_run_page(browser, stack: serve.Stack, run):
    from playwright.sync_api import expect

    from ppoflow.tracking import mlflow_ui_run_url

    page = browser.new_page()
    page.goto(mlflow_ui_run_url(run.info.experiment_id, run.info.run_id, base=stack.mlflow_url))
    expect(page.get_by_text("About this run")).to_be_visible()
    return page


@pytest.mark.ui
@TRIGGERED_TIMEOUT
def test_ui_mlflow_run_page_shows_datasets_model_hashes_and_registered_version(
    served_stack, browser, night_one, screenshots
):
    from playwright.sync_api import expect

    run, flow_run = night_one["run"], night_one["flow_run"]
    page = open_mlflow_run_page(browser, served_stack, run)
    page.set_viewport_size({"width": 1600, "height": 1000})  # the sidebar wide enough for a dataset's digest
    assistant = page.get_by_role("button", name="Close")  # MLflow's assistant panel hides the run's sidebar
    if assistant.is_visible():
        assistant.click()
    expect(page.get_by_text(run.info.run_name, exact=True).first).to_be_visible()

    # Datasets, each with its digest: the training one in the sidebar, the others behind "+N".
    train = night_one["datasets"]["training"]
    expect(page.get_by_text(f"{train.name} ({train.digest})")).to_be_visible()
    page.get_by_text(f"+{len(run.inputs.dataset_inputs) - 1}", exact=True).click()
    evaluation = night_one["datasets"]["evaluation"]
    expect(page.get_by_text(f"{evaluation.name} ({evaluation.digest})")).to_be_visible()
    page.keyboard.press("Escape")

    # The registered version in the sidebar.
    registered = page.get_by_text("Registered models", exact=True).locator("xpath=..")
    expect(registered.get_by_role("link", name=night_one["registered_model"])).to_be_visible()
    expect(registered.get_by_text(f"v{night_one['version']}", exact=True)).to_be_visible()

    # The description, expanded: each model's sha256 in full, the trained policy's, the version again.
    page.get_by_role("button", name="Expand description").click()
    for role in ("policy", "ref", "reward", "value"):
        expect(page.get_by_role("cell", name=run.data.tags[f"ppoflow.{role}.sha256"]).first).to_be_visible()
    expect(page.get_by_text(f"Trained policy sha256 {run.data.tags['ppoflow.trained_policy.sha256']}")).to_be_visible()
    release = page.get_by_text(f"Registered model {night_one['registered_model']} version {night_one['version']}")
    expect(release).to_be_visible()
    page.screenshot(
        path=screenshots / "mlflow-run.png",
        clip=clip_between(page, page.get_by_text("Description", exact=True).first, release),
    )

    # The link to the Prefect flow run opens its page.
    flow_run_page = page.get_by_role("link", name=f"{served_stack.prefect_url}/flow-runs/flow-run/{flow_run.id}")
    page.goto(flow_run_page.get_attribute("href"))
    expect(page.get_by_text(flow_run.name, exact=True).first).to_be_visible()
    expect(page.get_by_text("6 Task runs", exact=True)).to_be_visible()


@pytest.mark.ui
@TRIGGERED_TIMEOUT
def test_ui_logged_model_page_shows_its_registered_version(served_stack, browser, night_one, screenshots):
    from playwright.sync_api import expect

    run = night_one["run"]
    page = browser.new_page()
    page.goto(f"{served_stack.mlflow_url}/#/experiments/{run.info.experiment_id}/models/{night_one['model_id']}")
    versions = page.get_by_text("Model versions", exact=True).locator("xpath=..")
    expect(versions.get_by_role("link", name=night_one["registered_model"])).to_be_visible()
    expect(versions.get_by_text(f"v{night_one['version']}", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name=run.info.run_id[:8])).to_be_visible()  # source run id (shortened)
    page.screenshot(path=screenshots / "mlflow-logged-model.png")


@pytest.mark.ui
@TRIGGERED_TIMEOUT
def test_ui_model_version_page_links_its_run(served_stack, browser, night_one, screenshots):
    from playwright.sync_api import expect

    run = night_one["run"]
    page = browser.new_page()
    page.goto(f"{served_stack.mlflow_url}/#/models/{night_one['registered_model']}/versions/{night_one['version']}")
    source_run = page.get_by_role("link", name=run.info.run_name, exact=True)
    expect(source_run).to_be_visible()
    expect(page.get_by_text(run.data.tags["ppoflow.trained_policy.sha256"]).first).to_be_visible()
    description = page.get_by_text(f"PPO policy trained by ppoflow in MLflow run {run.info.run_id}")
    expect(description).to_be_visible()
    page.screenshot(
        path=screenshots / "mlflow-model-version.png",
        clip=clip_between(
            page,
            page.get_by_text(f"Version {night_one['version']}", exact=True).first,
            page.get_by_text("promotion gate (@").first,
        ),
    )
    source_run.click()
    expect(page.get_by_text("About this run")).to_be_visible()
    assert run.info.run_id in page.url


@pytest.mark.ui
@TRIGGERED_TIMEOUT
def test_ui_prefect_flow_run_page_shows_six_completed_tasks_artifacts_and_a_working_mlflow_link(
    served_stack, browser, night_one, screenshots
):
    from playwright.sync_api import expect

    flow_run, run = night_one["flow_run"], night_one["run"]
    page = browser.new_page()
    # The UI reaches the API of its own port (not :4200): else "Can't connect to Server API".
    page.goto(f"{served_stack.prefect_url}/flow-runs/flow-run/{flow_run.id}")
    expect(page.get_by_text("6 Task runs", exact=True)).to_be_visible()

    page.get_by_text("Task Runs", exact=True).click()
    expect(page.get_by_text("(6 completed)")).to_be_visible()  # the UI capitalizes it
    for stage in STAGES:
        expect(page.get_by_text(f"{stage}[{flow_run.name}]", exact=True).last).to_be_visible()

    page.get_by_text("Artifacts", exact=True).click()
    for key in ("mlflow-run", "rlhf-ppo-summary", "sample-completions", "ppo-training-progress"):
        expect(page.get_by_text(key, exact=True)).to_be_visible()
    page.screenshot(
        path=screenshots / "prefect-flow-run.png",
        clip=clip_between(
            page, page.get_by_text("Runs", exact=True).last, page.get_by_text("ppo-training-progress", exact=True)
        ),
    )

    page.get_by_text("mlflow-run", exact=True).click()
    link = page.get_by_role("link", name=f"MLflow run {run.info.run_id}")
    expect(link).to_be_visible()
    page.goto(link.get_attribute("href"))
    expect(page.get_by_text("About this run")).to_be_visible()
    expect(page.get_by_text(run.info.run_name, exact=True).first).to_be_visible()


@pytest.mark.ui
@TRIGGERED_TIMEOUT
def test_ui_prefect_task_run_page_shows_the_first_retry_delay(served_stack, browser, night_one, screenshots):
    from playwright.sync_api import expect

    with prefect_client(served_stack) as client:
        train = latest_task_runs(client, night_one["flow_run"].id)["train_ppo"]
    page = browser.new_page()
    page.goto(f"{served_stack.prefect_url}/runs/task-run/{train.id}")
    delay = page.get_by_text("Retry Delay", exact=True).locator("xpath=following-sibling::*[1]")
    expect(delay).to_have_text("1s")  # flow.retry_delay_seconds=[1, 5]; a list read "NaNs"
    page.screenshot(path=screenshots / "prefect-task-run.png")


# --------------------------------------------------------------------------- a person signs off
# (tracking.promotion.approval: required; the registry-level rules: tests/flow/test_approval.py)

APPROVAL_MODEL = "deploy-approval-policy"


def approval_overrides(toy: Path, workspace: Path, name: str, *extra: str) -> list[str]:
    """One PPO update of 16 prompts whose version passes the gate's numbers (min_win_rate 0) and waits."""
    return [
        *tiny_overrides(toy, workspace, name),
        "ppo.total_episodes=16",
        f"tracking.registered_model_name={APPROVAL_MODEL}",
        "tracking.promotion.approval=required",
        "tracking.promotion.min_win_rate=0",
        *extra,
    ]


def wait_suspended(client, flow_run_id: UUID, timeout: float = RUN_TIMEOUT):
    """The flow run once it is Suspended (awaiting approval); a final state is a failure here."""
    flow_run = wait_until(client, flow_run_id, lambda state: state.is_paused() or state.is_final(), timeout)
    if not flow_run.state.is_paused():
        pytest.fail(f"flow run {flow_run_id} ended {flow_run.state_name} before suspending: {flow_run.state.message}")
    return flow_run


def resume(client, flow_run_id: UUID, **answer: str) -> None:
    """Resume a suspended night with the form's answer, as the UI does, once the worker let go of it
    (as `ppoflow approve` waits: `wait_for_the_worker_to_let_go`)."""
    from ppoflow.flows.approval import wait_for_the_worker_to_let_go

    wait_for_the_worker_to_let_go(client.read_flow_run(flow_run_id).state)
    client.resume_flow_run(flow_run_id, run_input=answer)


def version_of(stack: serve.Stack, flow_run_id: UUID):
    """The registered version a flow run's training produced."""
    client, run = mlflow_run_of(stack, flow_run_id)
    (version,) = [v for v in client.search_model_versions(f"name='{APPROVAL_MODEL}'") if v.run_id == run.info.run_id]
    return version


def champion(stack: serve.Stack) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(
            mlflow.MlflowClient(tracking_uri=stack.mlflow_url)
            .get_model_version_by_alias(APPROVAL_MODEL, "champion")
            .version
        )
    except MlflowException:
        return None


@pytest.fixture(scope="module")
def awaiting(served_stack, toy_world, workspace) -> dict[str, Any]:
    """Nights "older" and "newer" with approval required, both suspended after registering, in that order."""
    with prefect_client(served_stack) as client:
        deployment = client.read_deployment_by_name("rlhf-ppo/toy-nightly")
        runs = {}
        for night in ("older", "newer"):
            overrides = approval_overrides(toy_world, workspace, f"approval-{night}")
            created = client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": overrides})
            runs[night] = wait_suspended(client, created.id)
    return runs


@TRIGGERED_TIMEOUT
def test_a_night_awaiting_approval_suspends_after_registering_with_its_review(served_stack, awaiting):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=served_stack.mlflow_url)
    for night, flow_run in awaiting.items():
        assert flow_run.state.name == "Suspended", night
        version = version_of(served_stack, flow_run.id)
        assert version.tags["ppoflow.approval"] == "pending" and "ppoflow.approval.deadline" in version.tags
        assert version.tags["ppoflow.promotion"].startswith("awaiting approval: win rate ")
        assert version.tags["ppoflow.approval.flow_run"] == str(flow_run.id)
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["ppoflow.approval"] == "pending"
        review = Path(client.download_artifacts(version.run_id, "approval/review.md")).read_text()
        assert review.startswith(f"# {APPROVAL_MODEL} version {version.version} awaits approval for @champion")
        assert f"/#/models/{APPROVAL_MODEL}/versions/{version.version}" in review
    assert champion(served_stack) is None
    newer = version_of(served_stack, awaiting["newer"].id)
    base = f"suspended-ppoflow-approval-{APPROVAL_MODEL}-v{newer.version}"  # the form's key: one per version
    with prefect_client(served_stack) as prefect:
        keys = {a.key for a in prefect.read_artifacts() if a.flow_run_id == awaiting["newer"].id}
        schema = json.loads(prefect.read_flow_run_input(awaiting["newer"].id, f"{base}-schema"))
        description = json.loads(prefect.read_flow_run_input(awaiting["newer"].id, f"{base}-description"))
    assert {"approval-review", "approval-answers", "rlhf-ppo-summary"} <= keys
    assert set(schema["properties"]) >= {"decision", "approver", "comment"}
    assert description.startswith(f"# {APPROVAL_MODEL} version {newer.version} awaits approval for @champion")


@TRIGGERED_TIMEOUT
def test_approvals_through_the_api_out_of_order_resume_cached_and_keep_the_newer_champion(served_stack, awaiting):
    """The newer night is approved first, then the older: @champion ends on the newer; each resumed
    flow run finds stages 1-6 Cached (nothing retrains or re-evaluates) and completes."""
    versions = {night: version_of(served_stack, flow_run.id) for night, flow_run in awaiting.items()}
    with prefect_client(served_stack) as client:
        finished = {}
        for night, approver in (("newer", "alice"), ("older", "bob")):
            resume(client, awaiting[night].id, decision="approve", approver=approver, comment=f"{night} ok")
            finished[night] = wait_final(client, awaiting[night].id)
            if night == "newer":
                assert champion(served_stack) == str(versions["newer"].version)
        stages = {night: latest_task_runs(client, flow_run.id) for night, flow_run in awaiting.items()}
        attempts = {
            night: [run.name.split("[")[0] for run in client.read_task_runs() if run.flow_run_id == flow_run.id]
            for night, flow_run in awaiting.items()
        }
    for night in awaiting:
        assert finished[night].state.is_completed(), (night, finished[night].state.message)
        assert {stage: run.state.name for stage, run in stages[night].items()} == dict.fromkeys(STAGES, "Cached")
        assert sorted(attempts[night]) == sorted(STAGES * 2)  # one run before the suspension, one after
    assert champion(served_stack) == str(versions["newer"].version)
    newer, older = (version_of(served_stack, awaiting[night].id) for night in ("newer", "older"))
    assert newer.tags["ppoflow.promotion"].startswith("promoted: approved by alice; win rate ")
    assert (older.tags["ppoflow.approval"], older.tags["ppoflow.approval.approver"]) == ("approved", "bob")
    assert older.tags["ppoflow.promotion"].startswith(
        f"rejected: approved by bob, but @champion holds version {newer.version}, which is newer"
    )
    assert newer.description.startswith("**Approved** by alice at ") and "newer ok" in newer.description.split("\n")[0]


@pytest.fixture(scope="module")
def timed_out_then_waiting(served_stack, awaiting, toy_world, workspace) -> dict[str, Any]:
    """Night "late" waits 20 s for a decision that never comes: Prefect fails it at the deadline. Then
    night "reviewed" runs (recording the timeout before its stages) and waits for the UI."""
    with prefect_client(served_stack) as client:
        deployment = client.read_deployment_by_name("rlhf-ppo/toy-nightly")
        late = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={
                "overrides": approval_overrides(
                    toy_world, workspace, "approval-late", "tracking.promotion.approval_timeout_hours=0.0056"
                )
            },
        )
        wait_suspended(client, late.id)
        late = wait_final(client, late.id, timeout=120)
        reviewed = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={"overrides": approval_overrides(toy_world, workspace, "approval-reviewed")},
        )
        return {"late": late, "reviewed": wait_suspended(client, reviewed.id)}


@TRIGGERED_TIMEOUT
def test_a_night_nobody_answers_is_rejected_as_timed_out_by_the_next_night(
    served_stack, alert_receiver, timed_out_then_waiting
):
    late = timed_out_then_waiting["late"]
    assert late.state.is_failed() and "never resumed" in (late.state.message or "")
    version = version_of(served_stack, late.id)
    assert version.tags["ppoflow.approval"] == "timed out"
    assert version.tags["ppoflow.promotion"].startswith("rejected: approval timed out at ")
    subject = f"ppoflow: {APPROVAL_MODEL} version {version.version} rejected"
    deadline = time.monotonic() + 90
    while subject not in {message["subject"] for message in alert_receiver.received} and time.monotonic() < deadline:
        time.sleep(0.5)
    (body,) = [message["body"] for message in alert_receiver.received if message["subject"] == subject]
    assert "approval timed out" in body and f"/flow-runs/flow-run/{late.id}" in body
    # and the reviewers heard when it began to wait, with the page of its form
    (waited,) = [
        message["body"]
        for message in alert_receiver.received
        if message["subject"] == f"ppoflow: {APPROVAL_MODEL} version {version.version} awaits approval"
    ]
    assert f"version {version.version} awaits approval for @champion — awaiting approval: win rate " in waited
    assert f"Flow run: {served_stack.prefect_url}/flow-runs/flow-run/{late.id}" in waited


@pytest.mark.ui
@TRIGGERED_TIMEOUT
def test_ui_the_approval_form_on_the_flow_run_page_rejects_a_night(
    served_stack, browser, awaiting, timed_out_then_waiting, screenshots
):
    """A reviewer opens the suspended night's page in the Prefect UI, reads the review in the Resume
    form, rejects it with a name and a comment: the flow run resumes (stages Cached) and completes,
    the version is rejected by that person, and @champion stays where it was."""
    from playwright.sync_api import expect

    reviewed = timed_out_then_waiting["reviewed"]
    version = version_of(served_stack, reviewed.id)
    holder = champion(served_stack)
    page = browser.new_page()
    page.goto(f"{served_stack.prefect_url}/flow-runs/flow-run/{reviewed.id}")
    page.get_by_role("button", name="Resume").first.click()
    dialog = page.get_by_role("dialog")
    expect(
        dialog.get_by_text(f"{APPROVAL_MODEL} version {version.version} awaits approval for @champion")
    ).to_be_visible()

    def field(label: str):  # the UI's schema form does not tie its labels to its inputs
        return dialog.locator(f".schema-form-property:has(.schema-form-property__label:text-is('{label}'))")

    field("Approver").locator("textarea").fill("carol")
    field("Comment (Optional)").locator("textarea").fill("answers too short")
    field("Decision").locator(".p-select-button").click()
    page.keyboard.press("ArrowDown")  # the select's list opens from the keyboard once it has the focus
    page.get_by_role("option", name="reject").click()
    expect(field("Decision")).to_contain_text("reject")
    dialog.locator(".p-modal__card").screenshot(path=screenshots / "prefect-approval-form.png")
    dialog.get_by_role("button", name="Submit").click()

    with prefect_client(served_stack) as client:
        finished = wait_final(client, reviewed.id)
        stages = latest_task_runs(client, reviewed.id)
    assert finished.state.is_completed(), finished.state.message
    assert {stage: run.state.name for stage, run in stages.items()} == dict.fromkeys(STAGES, "Cached")
    version = version_of(served_stack, reviewed.id)
    assert (version.tags["ppoflow.approval"], version.tags["ppoflow.approval.approver"]) == ("rejected", "carol")
    assert version.tags["ppoflow.promotion"].startswith("rejected: by carol (answers too short); win rate ")
    assert champion(served_stack) == holder
