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

from deployments import serve
from deployments.steps import load_run_config
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
        "flow.retry_delay_seconds=[0]",
    ]


def prefect_client(stack: serve.Stack):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(stack.api_url)


def wait_final(client, flow_run_id: UUID, timeout: float = RUN_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run
        if time.monotonic() > deadline:
            pytest.fail(f"flow run {flow_run_id} still {flow_run.state_name} after {timeout:.0f} s")
        time.sleep(1.0)


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
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`prefect.flow_run.{flow_run_id}` LIKE '%'")
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
            deployment.id, parameters={"overrides": chain_overrides(toy_world, partitions, workspace)})
        crash = ("reward_functions=[{path: 'ppoflow.toy:oracle_score', name: oracle, weight: 0.0}, "
                 "{path: 'tests.reliability.faulty_rewards:crash_once_after_update', weight: 0.0}]")
        fault = client.create_flow_run_from_deployment(
            deployment.id, parameters={"overrides": [*tiny_overrides(toy_world, workspace, "fault"), "flow.retries=0", crash]},
            job_variables={"env": {CRASH_ENV: f"1:{workspace / 'fault' / '.fault-injected-1'}"}})
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
            {"prefect.deployments.steps.set_working_directory": {"directory": str(serve.REPO_ROOT)}}]
        assert deployment.parameters == {"config": load_run_config(str(config_file(spec)))["config"], "overrides": []}
        assert deployment.job_variables == spec["work_pool"]["job_variables"]
        assert deployment.enforce_parameter_schema
        assert not deployment.paused
        schedules = [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules]
        assert schedules == [(s["cron"], s["timezone"], s["active"]) for s in spec["schedules"]]
    assert [s for s in declared()["toy-nightly"]["schedules"]] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert not any(s["active"] for s in declared()["my-model"]["schedules"])


def test_scheduler_plans_the_nightly_at_two_utc(served_stack, served_deployments):
    """The server's scheduler turns the cron into Scheduled runs at 02:00 UTC on the coming nights."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound

    deployment = served_deployments["toy-nightly"]
    with prefect_client(served_stack) as client:
        deadline = time.monotonic() + 20
        while True:
            planned = [run for run in client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
                if run.auto_scheduled]
            if planned or time.monotonic() > deadline:
                break
            time.sleep(1)
        try:
            times = sorted(run.expected_start_time.astimezone(timezone.utc) for run in planned)
            assert times, "the scheduler created no run for toy-nightly"
            now = datetime.now(timezone.utc)
            assert all((t.hour, t.minute, t.second) == (2, 0, 0) for t in times)
            assert now < times[0] <= now + timedelta(days=1)
            assert all(b - a == timedelta(days=1) for a, b in zip(times, times[1:]))
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
    assert good.parameters["overrides"][-1] == "flow.retry_delay_seconds=[0]"
    client, run = mlflow_run_of(served_stack, good.id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.last_flow_run_id"] == str(good.id)
    assert json.loads(run.data.tags[f"prefect.flow_run.{good.id}"])["deployment"] == "toy-nightly"
    assert run.data.params["output_dir"] == str(workspace / "nights" / str(good.id))  # {flow_run} expanded
    assert [m.step for m in client.get_metric_history(run.info.run_id, "objective/kl")] == [1, 2, 3, 4]
    assert {"eval/reward_policy", "eval/oracle_policy", "loss/policy_avg"} <= set(run.data.metrics)
    contexts = {tag.value for entry in run.inputs.dataset_inputs for tag in entry.tags if tag.key == "mlflow.data.context"}
    assert contexts == {"training", "evaluation", "partition"}
    versions = [v for v in client.search_model_versions(f"name='{CHAIN_MODEL}'") if v.run_id == run.info.run_id]
    assert len(versions) == 1 and versions[0].status == "READY"

    with prefect_client(served_stack) as prefect:
        artifacts = {a.key: a for a in prefect.read_artifacts() if a.flow_run_id == good.id}
    assert run.info.run_id in artifacts["mlflow-run"].data and served_stack.mlflow_url in artifacts["mlflow-run"].data
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
    retry = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "retry", str(fault.id)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert retry.returncode == 0, retry.stdout + retry.stderr

    with prefect_client(served_stack) as client:
        retried = wait_final(client, fault.id)
        assert retried.state.is_completed(), f"retried run ended {retried.state_name}: {retried.state.message}"
        assert retried.id == fault.id and retried.run_count == 2
        states = {stage: run.state.name for stage, run in latest_task_runs(client, fault.id).items()}
    assert states == {**dict.fromkeys(CACHED_ON_RETRY, "Cached"), "train_ppo": "Completed", "save_and_evaluate": "Completed"}

    # Training resumed after update 1 (its metrics line kept verbatim) instead of starting over.
    metrics_after = (output_dir / "metrics.jsonl").read_text().splitlines()
    assert metrics_after[0] == metrics_before[0]
    assert [json.loads(line)["update"] for line in metrics_after] == [1, 2, 3]

    # One MLflow run for the job, continued by the second attempt: each update logged once, one model version.
    client, run = mlflow_run_of(served_stack, fault.id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "objective/kl")] == [1, 2, 3]
    assert len([v for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'") if v.run_id == run.info.run_id]) == 1


@pytest.fixture(scope="module")
def chain(served_stack, triggered, toy_world, workspace, partitions) -> dict[str, Any]:
    """Nights 2 to 4 of the chain, one after the other through the deployment, each after a new
    partition landed: night 2 continues from @champion as deployed; nights 3 and 4 cannot beat the
    champion (the SFT model, barely trained) and share one fixed workspace, so night 4 is the same
    config on a new partition."""
    from ppoflow.toy import add_partition

    from_sft = [f"models.policy={toy_world / 'policy'}", "models.policy_fallback=null", "ppo.learning_rate=1e-9",
                "ppo.total_episodes=32", f"output_dir={workspace / SFT_NIGHTLY}"]
    nights = {"night 1": triggered["good"]}
    with prefect_client(served_stack) as client:
        deployment = client.read_deployment_by_name("rlhf-ppo/toy-nightly")
        for night, date, extra in (("night 2", "2026-12-02", []), ("night 3", "2026-12-03", from_sft), ("night 4", "2026-12-04", from_sft)):
            add_partition(partitions.parent, date, 160, seed=len(nights))
            overrides = [*chain_overrides(toy_world, partitions, workspace), *extra]
            flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": overrides})
            nights[night] = wait_final(client, flow_run.id)
    return nights


@TRIGGERED_TIMEOUT
def test_nightly_runs_chain_through_the_registry_and_promote_only_through_the_gate(served_stack, chain, toy_world, workspace):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=served_stack.mlflow_url)
    runs, versions = {}, {}
    for night, flow_run in chain.items():
        assert flow_run.state.is_completed(), f"{night} ended {flow_run.state_name}: {flow_run.state.message}"
        _, runs[night] = mlflow_run_of(served_stack, flow_run.id)
        (versions[night],) = [v for v in client.search_model_versions(f"name='{CHAIN_MODEL}'") if v.run_id == runs[night].info.run_id]
    number = {night: str(version.version) for night, version in versions.items()}
    assert sorted(number.values()) == ["1", "2", "3", "4"]
    decisions = {night: versions[night].tags["ppoflow.promotion"] for night in chain}

    # night 1: no champion yet, so it started from the SFT model and was judged against the reference
    assert versions["night 1"].tags["ppoflow.policy_source"] == str(toy_world / "policy")
    assert decisions["night 1"].startswith("promoted: win rate ") and decisions["night 1"].endswith(" against the reference")

    # night 2: from the champion (version 1), recorded as its parent, on the partition that landed before it
    assert runs["night 2"].data.tags["ppoflow.policy.registry_version"] == f"models:/{CHAIN_MODEL}/{number['night 1']}"
    assert versions["night 2"].tags["ppoflow.policy_source"] == f"models:/{CHAIN_MODEL}/{number['night 1']}"
    read = json.loads(runs["night 2"].data.tags["ppoflow.data.partitions"])
    assert [stem for stem, _ in read] == ["prompts-2026-12-02"]  # window {newest: 1}
    assert {entry.dataset.name for entry in runs["night 2"].inputs.dataset_inputs} >= {"prompts-2026-12-02"}
    assert decisions["night 2"].endswith(f" against models:/{CHAIN_MODEL}/{number['night 1']}")
    champion_after_2 = number["night 2"] if decisions["night 2"].startswith("promoted: ") else number["night 1"]

    # night 3 cannot beat the champion: rejected, the alias stays where it was, the decision is everywhere
    assert decisions["night 3"].startswith("rejected: win rate ") and decisions["night 3"].endswith(f" against models:/{CHAIN_MODEL}/{champion_after_2}")
    assert runs["night 3"].data.tags["ppoflow.promotion"] == decisions["night 3"]
    report = json.loads(Path(client.download_artifacts(runs["night 3"].info.run_id, "eval/eval.json")).read_text())
    assert report["promotion"]["promoted"] is False and report["promotion"]["decision"] == decisions["night 3"]
    with prefect_client(served_stack) as prefect:
        (summary,) = [a for a in prefect.read_artifacts() if a.flow_run_id == chain["night 3"].id and a.key == "rlhf-ppo-summary"]
        night_4_stages = {stage: run.state.name for stage, run in latest_task_runs(prefect, chain["night 4"].id).items()}
    assert decisions["night 3"] in summary.data

    # night 4: night 3's config in night 3's workspace on a new partition: stages 1-2 Cached, 3-6 run as a
    # new MLflow run (night 3's stays as it was), night 3's training archived whole, rejected as well
    assert night_4_stages == {**dict.fromkeys(STAGES[:2], "Cached"), **dict.fromkeys(STAGES[2:], "Completed")}
    assert runs["night 4"].info.run_id != runs["night 3"].info.run_id and runs["night 3"].info.status == "FINISHED"
    assert runs["night 4"].data.tags["ppoflow.config_hash"] == runs["night 3"].data.tags["ppoflow.config_hash"]
    assert runs["night 4"].data.tags["ppoflow.training_fingerprint"] != runs["night 3"].data.tags["ppoflow.training_fingerprint"]
    assert [stem for stem, _ in json.loads(runs["night 4"].data.tags["ppoflow.data.partitions"])] == ["prompts-2026-12-04"]
    (archived,) = (workspace / SFT_NIGHTLY / "archive").iterdir()
    assert archived.name.endswith(runs["night 3"].data.tags["ppoflow.training_fingerprint"][:16])
    assert {path.name for path in (archived / "checkpoints").iterdir()} == {"step-000000", "step-000002"}
    assert json.loads((archived / "eval.json").read_text())["promotion"]["decision"] == decisions["night 3"]
    assert decisions["night 4"].startswith("rejected: ")
    assert str(client.get_model_version_by_alias(CHAIN_MODEL, "champion").version) == champion_after_2
    assert str(client.get_model_version_by_alias(CHAIN_MODEL, "candidate").version) == number["night 4"]


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
