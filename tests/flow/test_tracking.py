"""ppoflow.tracking against a real embedded SQLite MLflow store (no server).

One store serves the whole module (creating its schema takes seconds); each test opens its own run
by giving its plan its own output directory (part of the config hash). The "server down" case uses
a real closed TCP port as the tracking URI, then resumes the run against the SQLite store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from ppoflow.config import DataConfig, TrackingConfig
from ppoflow.errors import TrackingError
from ppoflow.manifests import DatasetManifest, ModelManifest, ModelSource, PartitionRecord, Release
from ppoflow.tracking import (
    SPOOL_FILE,
    TrackingRun,
    check_reachable,
    check_release_names,
    default_tracking_uri,
    describe_release,
    log_release,
    open_run,
    resolve_tracking_uri,
)
from ppoflow.tracking.release import PLOTS, _plot

pytestmark = pytest.mark.flow

TRAINING = "t" * 64  # a training fingerprint (`manifests.training_fingerprint`)


def update(step: int, kl: float | None = None) -> dict:
    return {
        "update": step,
        "episode": 4 * (step + 1),
        "objective/kl": kl if kl is not None else 0.1 * step,
        "objective/scores": 1.0 + step,
        "objective/rlhf_reward": 0.9 + step,
        "loss/policy_avg": -0.01 * step,
        "loss/value_avg": 0.5 / (step + 1),
        "timing/rollout": 0.25,
        "note": "not a number",
    }


def steps_of(run: TrackingRun, key: str) -> list[int]:
    return sorted(point.step for point in run.client.get_metric_history(run.run_id, key))


def test_tracking_uri_defaults_to_sqlite_below_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/.ppoflow/mlflow/mlflow.db"
    assert resolve_tracking_uri().startswith("sqlite:////")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"


def test_check_reachable_fails_fast_and_names_the_fix(tmp_path, closed_port):
    started = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        check_reachable(f"http://alice:hunter2@127.0.0.1:{closed_port}")
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "MLFLOW_TRACKING_URI" in message and "does not answer" in message and "\n" not in message
    assert "hunter2" not in message and "alice:***@" in message
    with pytest.raises(TrackingError, match="file stores"):
        check_reachable(f"file://{tmp_path}")
    check_reachable(default_tracking_uri(tmp_path))
    assert (tmp_path / ".ppoflow" / "mlflow").is_dir()


def test_open_run_logs_the_plan_once_and_continues_the_same_run(store, make_plan, tmp_path):
    plan = make_plan(data=DataConfig(path="s3://reader:hunter2@bucket/prompts.jsonl"))
    run = open_run(plan, TRAINING, tracking_uri=store)
    run.log_plan(plan)
    again = open_run(plan, TRAINING, tracking_uri=store)
    again.log_plan(plan)  # a resumed job re-logs the same params without error
    assert again.run_id == run.run_id

    logged = run.client.get_run(run.run_id)
    assert logged.info.run_name == f"{Path(plan.config.models.policy).name}-{plan.config_hash[:8]}"
    params = logged.data.params
    assert params["ppo.learning_rate"] == "1e-05"
    assert params["batch.batch_size"] == str(plan.batch.batch_size)
    assert params["peft.target_modules"] == "all-linear"
    assert params["version.mlflow"] == mlflow.__version__ and "version.python" in params
    assert params["data.path"] == "s3://reader:***@bucket/prompts.jsonl"
    assert logged.data.tags["ppoflow.config_hash"] == plan.config_hash
    config_yaml = Path(run.client.download_artifacts(run.run_id, "config/config.yaml", str(tmp_path))).read_text()
    assert "learning_rate: 1.0e-05" in config_yaml and "hunter2" not in config_yaml
    assert not any("hunter2" in value for value in [*params.values(), *logged.data.tags.values()])

    # tracking settings are not part of the job's identity: changing them on resume is no collision
    retargeted = plan.model_copy(
        update={"config": plan.config.model_copy(update={"tracking": TrackingConfig(alias="staging")})}
    )
    run.log_plan(retargeted)
    assert run.client.get_run(run.run_id).data.tags["ppoflow.changed.tracking.alias"] == "staging"
    # a different job under the same hash is refused
    faster = plan.config.ppo.model_copy(update={"learning_rate": 1.0})
    collided = plan.model_copy(update={"config": plan.config.model_copy(update={"ppo": faster})})
    with pytest.raises(TrackingError, match="ppo.learning_rate"):
        run.log_plan(collided)


def test_a_finished_job_reuses_its_run_and_a_new_output_dir_or_training_gets_a_new_one(store, make_plan):
    plan = make_plan()
    run = open_run(plan, TRAINING, tracking_uri=store)
    run.finish()
    assert run.client.get_run(run.run_id).info.status == "FINISHED"
    reopened = open_run(plan, TRAINING, tracking_uri=store)
    assert reopened.run_id == run.run_id
    assert reopened.client.get_run(run.run_id).info.status == "RUNNING"
    assert open_run(make_plan("other"), TRAINING, tracking_uri=store).run_id != run.run_id
    tonight = open_run(plan, "n" * 64, tracking_uri=store)  # the same config on new partitions
    assert tonight.run_id != run.run_id
    assert tonight.client.get_run(tonight.run_id).data.tags["ppoflow.training_fingerprint"] == "n" * 64
    assert open_run(plan, TRAINING, tracking_uri=store).run_id == run.run_id


def test_metrics_sink_logs_each_update_once_across_a_resume(store, make_plan):
    plan = make_plan()
    run = open_run(plan, TRAINING, tracking_uri=store)
    sink = run.metrics_sink()
    for step in range(5):
        sink(update(step))
    assert run.flush(timeout=20)

    resumed = TrackingRun.attach(run.run_id, output_dir=plan.output_dir, tracking_uri=store)
    resumed_sink = resumed.metrics_sink()
    for step in range(3, 7):
        resumed_sink(update(step, kl=99.0))
    assert resumed.flush(timeout=20)

    assert steps_of(run, "objective/kl") == list(range(7))
    assert steps_of(run, "episode") == list(range(7))
    assert "note" not in run.client.get_run(run.run_id).data.metrics
    kl = {point.step: point.value for point in run.client.get_metric_history(run.run_id, "objective/kl")}
    assert kl[4] == pytest.approx(0.4) and kl[5] == 99.0
    assert not (plan.output_dir / SPOOL_FILE).exists()


def test_metrics_survive_an_unreachable_server_through_the_spool(store, make_plan, monkeypatch, closed_port):
    plan = make_plan()
    run = open_run(plan, TRAINING, tracking_uri=store)
    sink = run.metrics_sink()
    for step in range(3):
        sink(update(step))
    assert sink.flush(timeout=20)

    # The same run seen through a tracking URI where nothing listens: training must not notice.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = TrackingRun(
        mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{closed_port}"),
        run.run_id,
        run.experiment_id,
        plan.output_dir,
    )
    down_sink = down.metrics_sink()
    started = time.monotonic()
    for step in range(3, 6):
        down_sink(update(step))
    assert time.monotonic() - started < 1.0
    assert not down_sink.close(timeout=1.0)
    spooled = [json.loads(line) for line in (plan.output_dir / SPOOL_FILE).read_text().splitlines()]
    assert [record["step"] for record in spooled] == [3, 4, 5]

    # The job resumes against the real store (from a checkpoint at update 4): the spool is
    # re-delivered and the repeated update is not logged twice.
    resumed = TrackingRun.attach(run.run_id, output_dir=plan.output_dir, tracking_uri=store)
    resumed_sink = resumed.metrics_sink()
    for step in range(5, 8):
        resumed_sink(update(step))
    resumed.finish()
    assert steps_of(run, "objective/scores") == list(range(8))
    assert not (plan.output_dir / SPOOL_FILE).exists()


def test_datasets_are_logged_once_with_digests_and_contexts(store, make_plan, tmp_path):
    plan = make_plan()
    run = open_run(plan, TRAINING, tracking_uri=store)
    manifest = DatasetManifest(
        train_dir=tmp_path / "train",
        eval_dir=tmp_path / "eval",
        fingerprint="f" * 16,
        source=plan.config.data.path,
        rows_read=10,
        rows_kept=9,
        dropped_too_long=1,
        dropped_empty=0,
        eos_stripped=2,
        eos_dropped=0,
        train_rows=8,
        eval_rows=1,
        train_digest="a" * 64,
        eval_digest="b" * 64,
    )
    frames = {
        manifest.train_dir: pd.DataFrame({"prompt": ["great movie"] * 8, "input_ids": [[1, 4, 6]] * 8}),
        manifest.eval_dir: pd.DataFrame({"prompt": ["awful plot"], "input_ids": [[1, 5, 7]]}),
    }
    loaded = []

    def load(split_dir: Path) -> pd.DataFrame:
        loaded.append(split_dir)
        return frames[split_dir]

    run.log_datasets(manifest, load)
    assert loaded == [manifest.train_dir, manifest.eval_dir]
    run.log_datasets(manifest, load)
    assert len(loaded) == 2  # both already on the run: neither split is read again

    logged = run.client.get_run(run.run_id)
    inputs = {
        tag.value: entry.dataset
        for entry in logged.inputs.dataset_inputs
        for tag in entry.tags
        if tag.key == "mlflow.data.context"
    }
    assert len(logged.inputs.dataset_inputs) == 2
    assert inputs["training"].digest == "a" * 36 and inputs["evaluation"].digest == "b" * 36
    assert inputs["training"].name == "prompts-train"
    assert logged.data.tags["ppoflow.data.rows_kept"] == "9"


def test_models_and_flow_runs_are_tagged(store, make_plan, policy_dir):
    run = open_run(make_plan(), TRAINING, tracking_uri=store)
    source = ModelSource(
        role="policy",
        source=str(policy_dir),
        revision=None,
        local_dir=policy_dir,
        sha256="c" * 64,
        model_class="LlamaForCausalLM",
        num_parameters=2864,
    )
    run.log_models(
        ModelManifest(
            policy=source,
            ref=source,
            reward=source,
            value=source,
            tokenizer_dir=policy_dir,
            tokenizer_sha256="d" * 64,
            pad_token_id=0,
            eos_token_id=2,
            stop_token_id=None,
        )
    )
    run.tag_flow_run("flow-1", "brave-otter", None, "http://127.0.0.1:4200/runs/flow-run/flow-1")
    run.tag_flow_run("flow-2", "calm-heron", "ppo/nightly", None)
    run.tag_flow_run("flow-2", "calm-heron", "ppo/nightly", None)
    tags = run.client.get_run(run.run_id).data.tags
    assert tags["ppoflow.policy.sha256"] == "c" * 64 and tags["ppoflow.value.num_parameters"] == "2864"
    assert tags["ppoflow.ref.class"] == "LlamaForCausalLM" and tags["ppoflow.tokenizer.sha256"] == "d" * 64
    assert tags["ppoflow.reward.tokenizer"] == "the policy's" and "ppoflow.reward.tokenizer.sha256" not in tags
    run.log_models(
        ModelManifest(
            policy=source,
            ref=source,
            reward=source,
            value=source,
            tokenizer_dir=policy_dir,
            tokenizer_sha256="d" * 64,
            pad_token_id=0,
            eos_token_id=2,
            stop_token_id=2,
            reward_tokenizer_dir=policy_dir,
            reward_tokenizer_sha256="e" * 64,
            reward_chat_template=True,
        )
    )
    tags = run.client.get_run(run.run_id).data.tags
    assert tags["ppoflow.reward.tokenizer"].startswith("own") and tags["ppoflow.reward.tokenizer.sha256"] == "e" * 64
    assert tags["ppoflow.reward.chat_template"] == "its own"
    assert tags["prefect.flow_run_ids"] == "flow-1,flow-2" and tags["prefect.last_flow_run_id"] == "flow-2"
    assert json.loads(tags["prefect.flow_run.flow-2"]) == {
        "name": "calm-heron",
        "deployment": "ppo/nightly",
        "url": None,
    }


def test_system_metrics_are_sampled_into_the_run(store, make_plan):
    run = open_run(make_plan(), TRAINING, tracking_uri=store)
    run.start_system_metrics(sampling_interval=0.2)
    deadline = time.monotonic() + 60
    while (
        "system/cpu_utilization_percentage" not in run.client.get_run(run.run_id).data.metrics
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)  # polling: the monitor logs its first batch of samples when it is ready
    run.stop_system_metrics()
    assert "system/cpu_utilization_percentage" in run.client.get_run(run.run_id).data.metrics


def test_release_names_mlflow_would_refuse_are_refused_before_any_work():
    check_release_names(TrackingConfig(registered_model_name="team-policy", alias="candidate"))
    with pytest.raises(TrackingError, match="tracking.registered_model_name"):
        check_release_names(TrackingConfig(registered_model_name="team/policy"))
    with pytest.raises(TrackingError, match="tracking.alias"):
        check_release_names(TrackingConfig(alias="latest"))
    check_release_names(TrackingConfig(registered_model_name="team/policy", log_model=False))


def test_log_release_registers_the_policy_with_alias_and_eval_tags(store, make_plan, policy_dir, tmp_path):
    plan = make_plan()
    run = open_run(plan, TRAINING, tracking_uri=store)
    history = [update(step) for step in range(4)]
    release = Release(
        policy_dir=policy_dir, policy_sha256="e" * 64, eval_path=tmp_path / "eval.json", eval_metrics={"win_rate": 0.75}
    )
    report = {
        "reward_policy": 1.5,
        "reward_ref": 0.5,
        "win_rate": 0.75,
        "kl": 0.2,
        "eos_rate": 1.0,
        "oracle_policy": 0.8,
    }
    samples = pd.DataFrame(
        {"prompt": ["great movie"], "policy": ["great acting"], "ref": ["awful plot"], "reward": [1.2]}
    )
    arguments = dict(
        samples=samples,
        metrics_history=history,
        eval_report=report,
        policy_dir=policy_dir,
        registered_model_name="ppoflow-test-policy",
        alias="candidate",
        log_model=True,
        policy_source="models:/sft/3",
    )

    with pytest.raises(TrackingError, match="tracking.registered_model_name"):
        log_release(run, release, **{**arguments, "registered_model_name": "team/policy"})
    with pytest.raises(TrackingError, match="config.json"):
        log_release(run, release, **{**arguments, "policy_dir": tmp_path})
    assert run.client.list_artifacts(run.run_id) == []  # refused before any work
    released = log_release(run, release, **arguments)

    assert released.mlflow_run_id == run.run_id and released.registered_version == "1"
    assert released.registered_model == "ppoflow-test-policy" and released.model_uri.startswith("models:/m-")
    version = run.client.get_model_version_by_alias("ppoflow-test-policy", "candidate")
    assert str(version.version) == "1" and version.run_id == run.run_id
    assert version.source == released.model_uri
    assert version.tags["ppoflow.config_hash"] == plan.config_hash and float(version.tags["eval.win_rate"]) == 0.75
    assert version.tags["ppoflow.policy_source"] == "models:/sft/3"
    logged_model = run.client.get_logged_model(released.model_uri.removeprefix("models:/"))
    assert logged_model.source_run_id == run.run_id and logged_model.experiment_id == run.experiment_id
    assert str(logged_model.status) in ("READY", "LoggedModelStatus.READY")
    # the logged model's page lists the version (as `mlflow.register_model` would) and the hashes
    assert json.loads(logged_model.tags["mlflow.modelVersions"]) == [{"name": "ppoflow-test-policy", "version": "1"}]
    assert logged_model.params["ppoflow.config_hash"] == plan.config_hash
    assert logged_model.params["ppoflow.trained_policy.sha256"] == "e" * 64
    assert version.tags["ppoflow.trained_policy.sha256"] == "e" * 64 and "ppoflow.policy_sha256" not in version.tags

    logged = run.client.get_run(run.run_id)
    assert logged.data.metrics["eval/win_rate"] == 0.75
    assert logged.data.tags["ppoflow.trained_policy.sha256"] == "e" * 64
    assert [output.model_id for output in logged.outputs.model_outputs] == [logged_model.model_id]
    artifacts = {info.path for folder in ("eval", "plots") for info in run.client.list_artifacts(run.run_id, folder)}
    assert artifacts >= {
        "eval/samples.json",
        "eval/samples.csv",
        "eval/eval.json",
        "plots/reward.png",
        "plots/kl.png",
        "plots/losses.png",
    }

    # a retried release stage finds its version instead of registering the same weights again
    assert log_release(run, release, **arguments).registered_version == "1"
    assert len(run.client.search_model_versions("name = 'ppoflow-test-policy'")) == 1
    # and so does the retry of a run released before the tag was renamed
    run.client.delete_model_version_tag("ppoflow-test-policy", "1", "ppoflow.trained_policy.sha256")
    run.client.set_model_version_tag("ppoflow-test-policy", "1", "ppoflow.policy_sha256", "e" * 64)
    assert log_release(run, release, **arguments).registered_version == "1"
    assert len(run.client.search_model_versions("name = 'ppoflow-test-policy'")) == 1
    linked = run.client.get_logged_model(logged_model.model_id).tags["mlflow.modelVersions"]
    assert json.loads(linked) == [{"name": "ppoflow-test-policy", "version": "1"}]
    assert [point.step for point in run.client.get_metric_history(run.run_id, "eval/win_rate")] == [3]


def test_the_run_the_version_and_the_registered_model_are_described_after_the_gate(
    store, make_plan, policy_dir, tmp_path
):
    plan = make_plan("described")
    run = open_run(plan, TRAINING, tracking_uri=store)
    run.tag_flow_run("flow-1", "brave-otter", "ppo/nightly", "http://127.0.0.1:4200/runs/flow-run/flow-1")
    sft = ModelSource(
        role="policy",
        source="models:/sft/3",
        revision=None,
        local_dir=policy_dir,
        sha256="c" * 64,
        model_class="LlamaForCausalLM",
        num_parameters=2864,
        registry_uri="models:/sft/3",
    )
    reward = sft.model_copy(
        update={"role": "reward", "source": str(policy_dir), "sha256": "d" * 64, "registry_uri": None}
    )
    models = ModelManifest(
        policy=sft,
        ref=sft.model_copy(update={"role": "ref"}),
        reward=reward,
        value=reward.model_copy(update={"role": "value"}),
        tokenizer_dir=policy_dir,
        tokenizer_sha256="d" * 64,
        pad_token_id=0,
        eos_token_id=2,
        stop_token_id=None,
    )
    partition = PartitionRecord(path=tmp_path / "prompts-2026-12-01.jsonl", date="2026-12-01", sha256="9" * 64, rows=2)
    data = DatasetManifest(
        train_dir=tmp_path / "train",
        eval_dir=tmp_path / "eval",
        fingerprint="f" * 16,
        source=str(tmp_path),
        rows_read=2,
        rows_kept=2,
        dropped_too_long=0,
        dropped_empty=0,
        eos_stripped=0,
        eos_dropped=0,
        train_rows=1,
        eval_rows=1,
        train_digest="a" * 64,
        eval_digest="b" * 64,
        partitions=[partition],
    )
    release = Release(
        policy_dir=policy_dir,
        policy_sha256="e" * 64,
        eval_path=tmp_path / "eval.json",
        eval_metrics={"win_rate": 0.75, "kl": 0.2},
        mlflow_run_id=run.run_id,
        model_uri="models:/m-1",
        registered_model="ppoflow-described",
        registered_version="1",
        promotion={"alias": "champion", "decision": "promoted: win rate 0.75 >= 0.5 against the reference"},
    )
    run.client.create_registered_model("ppoflow-described")
    run.client.create_model_version("ppoflow-described", source=str(policy_dir), run_id=run.run_id)
    describe_release(run, release, models, data)

    note = run.client.get_run(run.run_id).data.tags["mlflow.note.content"]
    assert note.startswith(f"# PPO run `{plan.config_hash}`")
    for text in (
        "c" * 64,
        "d" * 64,
        "`models:/sft/3`",
        "a" * 64,
        "b" * 64,
        "9" * 64,
        "prompts-2026-12-01.jsonl",
        "e" * 64,
        "`flow-1` brave-otter (deployment ppo/nightly): http://127.0.0.1:4200/runs/flow-run/flow-1",
        "**ppoflow-described** version **1**",
        "promoted: win rate 0.75 >= 0.5 against the reference",
    ):
        assert text in note, text
    described = run.client.get_model_version("ppoflow-described", "1").description
    for text in (
        run.run_id,
        plan.config_hash,
        "e" * 64,
        "models:/sft/3",
        "c" * 64,
        "a" * 64,
        "win_rate 0.75",
        "@champion): promoted",
    ):
        assert text in described, text
    assert run.client.get_registered_model("ppoflow-described").description.startswith(
        "PPO policies trained by ppoflow"
    )
    run.client.update_registered_model("ppoflow-described", description="the team's own words")
    describe_release(run, release, models, data)
    assert run.client.get_registered_model("ppoflow-described").description == "the team's own words"


def test_plots_show_the_reward_functions_and_each_loss_on_its_own_axis():
    history = [
        update(step) | {"reward/length": 0.1 * step, "reward/sentiment": float("nan") if step == 1 else 0.5}
        for step in range(4)
    ]
    reward = _plot(history, PLOTS["reward"], "reward")
    (axes,) = reward.axes
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels == ["objective/scores", "objective/rlhf_reward", "reward/length", "reward/sentiment"]
    assert list(axes.get_lines()[3].get_xdata()) == [0, 2, 3]  # the non-finite point left out
    losses = _plot(history, PLOTS["losses"], "losses")
    left, right = losses.axes
    assert [line.get_label() for line in left.get_lines()] == ["loss/policy_avg"]
    assert [line.get_label() for line in right.get_lines()] == ["loss/value_avg"]
    assert left.get_ylabel() == "loss/policy_avg" and right.get_ylabel() == "loss/value_avg"
    assert [text.get_text() for text in left.get_legend().get_texts()] == ["loss/policy_avg", "loss/value_avg"]
    assert len(_plot([update(step) for step in range(2)], PLOTS["reward"], "reward").axes[0].get_lines()) == 2
    assert _plot([{"update": 1, "loss/value_avg": 0.5}], PLOTS["losses"], "losses").axes[0].get_ylabel() == ""
    assert _plot([{"update": 1}], PLOTS["kl"], "kl") is None
    evaluated = [
        update(step)
        | ({"eval/reward_policy": 0.1 * step, "eval/reward_ref": 0.0, "eval/win_rate": 0.5} if step in (2, 3) else {})
        for step in range(1, 4)
    ]
    scores, win_rate = _plot(evaluated, PLOTS["eval"], "eval").axes
    assert [list(line.get_xdata()) for line in scores.get_lines()] == [[2, 3], [2, 3]]
    assert [line.get_label() for line in win_rate.get_lines()] == ["eval/win_rate"]
    assert _plot(history, PLOTS["eval"], "eval") is None  # no ppo.eval_every: no eval plot


def test_partitions_are_logged_once_as_inputs_and_listed_in_a_tag(store, make_plan, tmp_path):
    plan = make_plan("nightly")
    run = open_run(plan, TRAINING, tracking_uri=store)
    nightly = tmp_path / "nightly"
    nightly.mkdir()
    partitions = []
    for day, digest in (("2026-11-30", "c" * 64), ("2026-12-01", "d" * 64)):
        path = nightly / f"prompts-{day}.jsonl"
        path.write_text('{"prompt": "great movie"}\n')
        partitions.append(PartitionRecord(path=path, date=day, sha256=digest, rows=1))
    manifest = DatasetManifest(
        train_dir=tmp_path / "train",
        eval_dir=tmp_path / "eval",
        fingerprint="f" * 16,
        source=str(nightly),
        rows_read=2,
        rows_kept=2,
        dropped_too_long=0,
        dropped_empty=0,
        eos_stripped=0,
        eos_dropped=0,
        train_rows=1,
        eval_rows=1,
        train_digest="a" * 64,
        eval_digest="b" * 64,
        partitions=partitions,
    )
    frame = pd.DataFrame({"prompt": ["great movie"], "input_ids": [[1, 4, 6]]})
    run.log_datasets(manifest, lambda split_dir: frame)
    run.log_datasets(manifest, lambda split_dir: frame)

    logged = run.client.get_run(run.run_id)
    contexts = sorted(
        (tag.value, entry.dataset.name, entry.dataset.digest)
        for entry in logged.inputs.dataset_inputs
        for tag in entry.tags
        if tag.key == "mlflow.data.context"
    )
    assert contexts == [
        ("evaluation", "nightly-eval", "b" * 36),
        ("partition", "prompts-2026-11-30", "c" * 36),
        ("partition", "prompts-2026-12-01", "d" * 36),
        ("training", "nightly-train", "a" * 36),
    ]
    sources = {entry.dataset.name: json.loads(entry.dataset.source) for entry in logged.inputs.dataset_inputs}
    assert sources["prompts-2026-12-01"]["uri"].endswith("nightly/prompts-2026-12-01.jsonl")
    assert json.loads(logged.data.tags["ppoflow.data.partitions"]) == [
        ["prompts-2026-11-30", "c" * 64],
        ["prompts-2026-12-01", "d" * 64],
    ]


def test_the_partitions_tag_keeps_the_newest_within_mlflow_s_limit(tmp_path):
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    from ppoflow.tracking.run import _partitions_tag

    partitions = [
        PartitionRecord(path=tmp_path / f"prompts-{day:04d}.jsonl", date=None, sha256=f"{day:064d}", rows=1)
        for day in range(200)
    ]
    manifest = DatasetManifest(
        train_dir=tmp_path,
        eval_dir=tmp_path,
        fingerprint="f",
        source="s",
        rows_read=1,
        rows_kept=1,
        dropped_too_long=0,
        dropped_empty=0,
        eos_stripped=0,
        eos_dropped=0,
        train_rows=1,
        eval_rows=0,
        train_digest="a",
        eval_digest="b",
        partitions=partitions,
    )
    entries = json.loads(text := _partitions_tag(manifest))
    assert len(text) == 7981 <= MAX_TAG_VAL_LENGTH and len(entries) == 95  # 83 characters an entry, and commas
    assert entries[-1] == ["prompts-0199", f"{199:064d}"] and entries[0][0] == "prompts-0105"
