"""The flow (`ppoflow run`, embedded Prefect) against a real MLflow tracking server, under fire.

One campaign, three flow processes on one config (the suite's training config), with secrets in
their environment:

1. SIGKILLed (with its embedded Prefect server) when stage 3 has just written `data/dataset.json`;
2. SIGKILLed in the middle of training (a random moment after checkpoint 3);
3. run to the end, while the MLflow server is stopped during its training and started again
   (same home, same port).

The tests below check what each fault must leave: finished stages reused (Cached in the Prefect
database the embedded servers kept), training resumed to the reference policy bit for bit, every
update's metrics in MLflow exactly once, and no secret in anything the runs wrote. Three flow
processes only: each pays for its own embedded Prefect server (~10 s) and imports.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import mlflow
import pytest

from ppoflow.mlflow_server.server import start_server, stop_server
from tests.reliability.helpers import (
    FLOW_SETTINGS,
    NUM_UPDATES,
    assert_same_run,
    checkpoint_steps,
    error_lines,
    kill_session,
    read_metrics,
    reliability_config,
    start_cli,
    subprocess_env,
    summary_of,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.flow]

STAGES = ["configure", "load_models", "prepare_dataset", "init_trainer", "train_ppo", "save_and_evaluate"]
TRAINING_METRICS = ["objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "lr"]
TIMEOUT = 900.0
# For the tests that ask for `campaign`: whichever runs first pays for it (~1.5 min on 2 quiet cores,
# and the reference run and toy world if nothing built them yet). The default is in pyproject.toml.
CAMPAIGN_TIMEOUT = pytest.mark.timeout(900)


def prefect_task_states(prefect_home: Path) -> list[dict[str, str]]:
    """Stage states of every flow run, oldest first, from the database the embedded servers kept."""
    with sqlite3.connect(f"file:{prefect_home / 'prefect.db'}?mode=ro", uri=True) as db:
        flow_runs = [row[0] for row in db.execute("SELECT id FROM flow_run ORDER BY created")]
        tasks = db.execute("SELECT flow_run_id, name, state_name FROM task_run ORDER BY created").fetchall()
    states: list[dict[str, str]] = []
    for flow_run in flow_runs:
        stages = {name.split("[")[0]: state for run, name, state in tasks if run == flow_run}
        states.append({"flow_run_id": flow_run, **stages})
    return states


def _recorded(workdir: Path, stage: str, state: str) -> bool:
    """The embedded server has `stage` of the newest flow run in `state`. Prefect 3 reports task
    states as events that the server records a moment later, so a kill as soon as a stage's files
    are on disk could lose the record of the stage before it (not its cached result)."""
    try:
        states = prefect_task_states(workdir / "prefect")
    except sqlite3.Error:  # not created yet, or busy
        return False
    return bool(states) and states[-1].get(stage) == state


def _start_flow(
    config_path: Path, workdir: Path, name: str, env: dict[str, str]
) -> tuple[subprocess.Popen, Path, Path]:
    log, out = workdir / f"{name}.log", workdir / f"{name}.out"
    return start_cli(["run", "--config", str(config_path)], log, env, stdout=out), log, out


@pytest.fixture(scope="module")
def campaign(toy_world, reference, tmp_path_factory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("flow-faults")
    server_home = workdir / "mlflow-server"
    server = start_server(server_home, port=0)
    found: dict[str, Any] = {"workdir": workdir, "server": server, "server_home": server_home}
    try:
        found |= _run_campaign(toy_world, workdir, server_home, server.port)
        yield found  # the server stays up for the tests' own queries
    finally:
        stop_server(server_home)


def _run_campaign(toy_world: Path, workdir: Path, server_home: Path, port: int) -> dict[str, Any]:
    rng = random.Random()
    secret = {
        "HF_TOKEN": "hf_" + secrets.token_hex(16),
        "HUGGING_FACE_HUB_TOKEN": "hf_" + secrets.token_hex(16),
        "MLFLOW_TRACKING_USERNAME": "ppoflow-" + secrets.token_hex(4),
        "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(16),
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
        "DATABASE_URL": f"postgresql://mlflow:{secrets.token_hex(12)}@127.0.0.1:5432/mlflow",
    }
    uri_password = secrets.token_hex(12)
    tracking_uri = f"http://ppoflow:{uri_password}@127.0.0.1:{port}"
    env = subprocess_env(PREFECT_HOME=str(workdir / "prefect"), MLFLOW_TRACKING_URI=tracking_uri, **secret)
    output_dir = workdir / "run"
    config_path = write_config(
        reliability_config(toy_world, output_dir, *FLOW_SETTINGS, f"flow.result_storage={workdir / 'prefect-results'}"),
        workdir / "flow.yaml",
    )

    first, first_log, _ = _start_flow(config_path, workdir, "first", env)
    assert wait_for(
        lambda: (output_dir / "data" / "dataset.json").exists() and _recorded(workdir, "load_models", "Completed"),
        TIMEOUT,
        alive=lambda: first.poll() is None,
    ), first_log.read_text()[-3000:]
    kill_session(first)

    second, second_log, _ = _start_flow(config_path, workdir, "second", env)
    assert wait_for(lambda: 3 in checkpoint_steps(output_dir), TIMEOUT, alive=lambda: second.poll() is None), (
        second_log.read_text()[-3000:]
    )
    time.sleep(rng.uniform(0.0, 1.0))
    killed_at = max(checkpoint_steps(output_dir))
    kill_session(second)

    third, third_log, third_out = _start_flow(config_path, workdir, "third", env)
    assert wait_for(
        lambda: max(checkpoint_steps(output_dir), default=0) > killed_at, TIMEOUT, alive=lambda: third.poll() is None
    ), third_log.read_text()[-3000:]
    outage_began, steps_at_outage = time.monotonic(), checkpoint_steps(output_dir)
    stop_server(server_home)
    start_server(server_home, port=port)  # blocks until /health answers
    outage_seconds = time.monotonic() - outage_began
    assert third.wait(TIMEOUT) == 0, third_log.read_text()[-4000:]
    return {
        "output_dir": output_dir,
        "secrets": {**secret, "tracking URI password": uri_password},
        "client_uri": f"http://127.0.0.1:{port}",
        "prefect_home": workdir / "prefect",
        "results": workdir / "prefect-results",
        "logs": [workdir / f"{name}.{kind}" for name in ("first", "second", "third") for kind in ("log", "out")],
        "third_log": third_log.read_text(),
        "summary": summary_of(third_out.read_text()),
        "killed_at_checkpoint": killed_at,
        "outage_seconds": round(outage_seconds, 1),
        "steps_at_outage": steps_at_outage,
        "states": prefect_task_states(workdir / "prefect"),
    }


@CAMPAIGN_TIMEOUT
def test_a_flow_killed_between_stages_reuses_the_finished_ones(campaign, faults):
    faults.injected("sigkill: flow process", moment="stage 3 had written data/dataset.json")
    first, second, third = campaign["states"]
    assert (first["configure"], first["load_models"]) == ("Completed", "Completed")
    assert (second["configure"], second["load_models"]) == ("Cached", "Cached")
    assert second["prepare_dataset"] in ("Completed", "Cached") and second["init_trainer"] == "Completed"
    assert third["prepare_dataset"] == "Cached"


@CAMPAIGN_TIMEOUT
def test_a_flow_killed_mid_training_resumes_to_the_same_policy(campaign, reference, faults):
    faults.injected("sigkill: flow process", moment=f"training, after checkpoint {campaign['killed_at_checkpoint']}")
    third = campaign["states"][2]
    assert {stage: third[stage] for stage in STAGES} == {
        "configure": "Cached",
        "load_models": "Cached",
        "prepare_dataset": "Cached",
        "init_trainer": "Cached",
        "train_ppo": "Completed",
        "save_and_evaluate": "Completed",
    }
    assert "resuming from step-" in campaign["third_log"]
    assert campaign["summary"]["updates"] == NUM_UPDATES
    assert_same_run(reference, campaign["output_dir"])


@CAMPAIGN_TIMEOUT
def test_a_tracking_server_gone_mid_run_gets_every_metric_once(campaign, faults):
    faults.injected(
        "MLflow server stopped and restarted", where="during training", outage_seconds=campaign["outage_seconds"]
    )
    # The outage really hit training: it began before the last checkpoint, and the metrics sender met
    # a closed port (MLflow's client retries with backoff; the sink spools and re-sends what fails).
    assert max(campaign["steps_at_outage"]) < NUM_UPDATES
    assert "Failed to establish a new connection" in campaign["third_log"]
    client = mlflow.MlflowClient(tracking_uri=campaign["client_uri"])
    run = client.get_run(campaign["summary"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # One MLflow run for the job, tagged by every flow run that reached it: it opens after stage 3, where
    # the first flow run was killed, so the second and third (and the first only had it opened in time).
    first, second, third = (UUID(str(states["flow_run_id"])) for states in campaign["states"])
    worked_on = {UUID(item) for item in run.data.tags["prefect.flow_run_ids"].split(",")}
    assert {second, third} <= worked_on <= {first, second, third}
    for key in TRAINING_METRICS:
        steps = [point.step for point in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, NUM_UPDATES + 1)), (key, sorted(steps))
    expected = {row["update"]: row["objective/scores"] for row in read_metrics(campaign["output_dir"])}
    logged = {point.step: point.value for point in client.get_metric_history(run.info.run_id, "objective/scores")}
    assert logged == pytest.approx(expected)
    assert not (campaign["output_dir"] / "mlflow_spool.jsonl").exists()
    versions = client.search_model_versions("name = 'reliability-policy'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id


@CAMPAIGN_TIMEOUT
def test_no_secret_is_written_anywhere(campaign):
    # Everything the three runs wrote: workspace, MLflow store and artifacts (and the server's log),
    # Prefect's database (parameters, logs, states) and result storage, and all captured output.
    places = [
        campaign["output_dir"],
        campaign["server_home"],
        campaign["prefect_home"],
        campaign["results"],
        *campaign["logs"],
    ]
    files = [path for place in places for path in ([place] if place.is_file() else place.rglob("*")) if path.is_file()]
    assert (
        len(files) > 50
        and any(path.name == "mlflow.db" for path in files)
        and any(path.name == "prefect.db" for path in files)
    )
    leaks = [
        f"{name} in {path}"
        for path in files
        for name, value in campaign["secrets"].items()
        if value.encode() in path.read_bytes()
    ]
    assert not leaks, leaks
    summary = json.dumps(campaign["summary"])
    assert not any(value in summary for value in campaign["secrets"].values())


def test_a_tracking_server_unreachable_at_start_stops_the_flow_in_one_line_before_any_work(
    toy_world, tmp_path, closed_port, faults
):
    env = subprocess_env(PREFECT_HOME=str(tmp_path / "prefect"), MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed_port}")
    output_dir = tmp_path / "run"
    config_path = write_config(
        reliability_config(toy_world, output_dir, *FLOW_SETTINGS, f"flow.result_storage={tmp_path / 'results'}"),
        tmp_path / "flow.yaml",
    )
    process, log, out = _start_flow(config_path, tmp_path, "unreachable", env)
    faults.injected("MLflow server unreachable", where="at start")
    assert process.wait(TIMEOUT) == 2, log.read_text()[-3000:]
    assert out.read_text() == ""
    stderr = log.read_text()
    (line,) = error_lines(stderr)
    assert line.startswith(
        f"error: MLflow tracking server MLFLOW_TRACKING_URI=http://127.0.0.1:{closed_port} does not answer ("
    )
    assert " — start it (mlflow_server/) or fix MLFLOW_TRACKING_URI" in line
    assert "Traceback" not in stderr and "prefect" not in stderr.lower(), stderr[-3000:]  # no Prefect log line either
    assert not (tmp_path / "prefect" / "prefect.db").exists()  # the ephemeral Prefect server never started: no flow run
    assert not output_dir.exists() and not (tmp_path / "results").exists()
