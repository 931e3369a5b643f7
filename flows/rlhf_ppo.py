"""The RLHF PPO pipeline as one Prefect flow: six cached, retried stages with MLflow lineage.

```
RunConfig ─1 configure────────→ RunPlan
          ─2 load_models──────→ ModelManifest
          ─3 prepare_dataset──→ DatasetManifest  MLflow: the run of this training, plan as params,
                                                 model lineage tags, dataset inputs with digests
          ─4 init_trainer─────→ Checkpoint       step 0
          ─5 train_ppo────────→ Checkpoint       MLflow: per-update metrics; Prefect: progress
          ─6 save_and_evaluate→ Release          MLflow: logged + registered model with alias
```

`output_dir` may hold `{date}` (the UTC day of the flow run's scheduled start) and `{flow_run}` (the
flow run's id): the same for every retry of that flow run, so a retry resumes in its workspace.

A stage whose inputs and source are unchanged comes back `Cached` in any later flow run, unless
the files its manifest names are gone or changed (`ppoflow.tasks.common`). A failed flow run re-run (or
retried) finds stages 1–4 cached and resumes training from its newest checkpoint.

Parameters: `config`, a whole `RunConfig` (the UI renders it as a form and a deployment stores it as
JSON), and `overrides`, `key.path=value` strings applied on top (as `--set` does).

A training is the config hash plus what stages 2 and 3 found (`training_fingerprint`: the models'
hashes, the data's fingerprint), so the MLflow run opens after stage 3. With the same config in the
same workspace, a new partition in the data window (or a registry alias that moved: stage 2 resolves
aliases again in each new flow run) finds stages 1-2 `Cached`, archives the previous training
(`archive/`) and runs stages 3-6 as a new MLflow run.

A failed or crashed flow run leaves a `rlhf-ppo-failure` markdown artifact (the failed stage, the
error line, how to resume) and tags its MLflow run, if it opened one (from stage 4 on), with
`ppoflow.failure`. A failed one, and the promotion gate's decision, are also Prefect events
(`ppoflow.night.failed`, `ppoflow.promotion.promoted` / `.rejected`: `ppoflow.flows.alerts`).

With `tracking.promotion.approval: required`, a version that passes the gate's numbers waits for a
person after stage 6 (`ppoflow.flows.approval`): a deployment's flow run suspends, `ppoflow run`
pauses; the answer moves the alias or leaves it, and the decision is recorded and announced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import Flow, Task, flow
from prefect.artifacts import MarkdownArtifact, create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import Pause
from prefect.runtime import deployment, flow_run
from prefect.settings import PREFECT_UI_URL
from prefect.states import State

from ppoflow import console, tracking
from ppoflow.cli import final_metrics, run_summary
from ppoflow.config import RunConfig, build_config, expand_output_dir, names_registry_alias
from ppoflow.data import load_prompts
from ppoflow.flows import alerts, approval
from ppoflow.hub import check_push
from ppoflow.locking import output_dir_lock
from ppoflow.manifests import DatasetManifest, ModelManifest, Release, RunPlan, training_fingerprint
from ppoflow.redaction import redact
from ppoflow.tasks import Stages
from ppoflow.tasks.common import quiet_user_error_tracebacks
from ppoflow.workspace import SAMPLES_FILE, read_jsonl

FAILURE_ARTIFACT = "rlhf-ppo-failure"


def run_name() -> str:
    """`policy-3f2a9c01`: the policy model's name and the config hash (as the MLflow run is named), of
    the config with its placeholders expanded (the flow run's id and scheduled start are known here)."""
    parameters = flow_run.parameters
    try:
        config = effective_config(
            RunConfig.model_validate(parameters["config"]),
            parameters.get("overrides"),
            flow_run.scheduled_start_time,
            flow_run.id,
        )
    except Exception:  # the flow body reports a bad config with its message
        return "rlhf-ppo-invalid-config"
    return tracking.run_name(config, config.config_hash())


def record_failure(_flow: Flow, run: FlowRun, state: State) -> None:
    """`on_failure` and `on_crashed`: tag the MLflow run this flow run worked on (if it opened one) with
    the error line, and leave the `rlhf-ppo-failure` artifact: failed stage, error line, how to resume."""
    error = state.result(raise_on_failure=False)
    reason = redact(tracking.first_line(error) if isinstance(error, BaseException) else (state.message or state.name))
    if isinstance(error, BaseException) and not reason.startswith(type(error).__name__):
        reason = f"{type(error).__name__}: {reason}"
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    failed = [
        task.name.split("[")[0]
        for task in task_runs
        if task.state is not None and (task.state.is_failed() or task.state.is_crashed())
    ]
    stage = failed[-1] if failed else None
    try:
        config = effective_config(
            RunConfig.model_validate(run.parameters["config"]),
            run.parameters.get("overrides"),
            run.expected_start_time,
            run.id,
        )
    except Exception:  # the config itself is what failed: the reason says so
        config = None
    tagged = None
    if config is not None:
        try:
            tagged = tracking.tag_failure(str(run.id), config.tracking.experiment, reason, stage)
        except Exception as exc:  # the tracking store may be what failed; the artifact still tells
            logging.getLogger(__name__).warning(
                "the MLflow run was not tagged with the failure: %s", redact(tracking.first_line(exc))
            )
    mlflow_run_id = tagged.run_id if tagged is not None else None
    if state.is_failed():  # a crash is Prefect's own event (prefect.flow-run.Crashed): no hook runs in a killed process
        alerts.emit_failure(
            run.name,
            str(run.id),
            stage,
            reason,
            alerts.flow_run_page(run.id),
            alerts.mlflow_page(tagged.tracking_uri, tagged.experiment_id, tagged.run_id) if tagged else None,
        )
    MarkdownArtifact(
        key=FAILURE_ARTIFACT,
        description="Why this flow run failed and how to resume it",
        flow_run_id=run.id,
        markdown=failure_markdown(run, state, stage, reason, config, mlflow_run_id),
    ).create()


def failure_markdown(
    run: FlowRun, state: State, stage: str | None, reason: str, config: RunConfig | None, mlflow_run_id: str | None
) -> str:
    where = f"in stage `{stage}`" if stage else "before stage 1 (the start-up checks)"
    lines = [f"# Flow run `{run.name}` {state.name.lower()} {where}", "", "```", reason, "```", ""]
    if config is not None:
        lines.append(f"Workspace `{config.output_dir}`.")
    if mlflow_run_id:
        lines.append(f"MLflow run `{mlflow_run_id}` ended FAILED, tagged `{tracking.FAILURE_TAG}`.")
    lines += [
        "",
        "To resume (finished stages come back Cached, training "
        "continues from its newest checkpoint): fix the cause, then",
        "",
        "```",
        f"prefect flow-run retry {run.id}"
        + ("" if run.deployment_id else f" --entrypoint {Path(__file__).resolve()}:rlhf_ppo"),
        "```",
        "",
        "or start the same command (`ppoflow run --config ...`) or deployment again: a "
        "new flow run resumes the same workspace unless output_dir holds `{flow_run}` (a "
        "new flow run id, a new workspace); `{date}` is the day it was scheduled for.",
    ]
    return "\n".join(lines) + "\n"


@flow(
    name="rlhf-ppo",
    flow_run_name=run_name,
    description="RLHF with PPO: policy, reference, reward and value models.",
    on_failure=[record_failure],
    on_crashed=[record_failure],
)
def rlhf_ppo(config: RunConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train a policy with PPO against a reward model; return the run summary."""
    quiet_user_error_tracebacks()
    if logging.getLogger("ppoflow").level == logging.NOTSET:  # a worker's process: no CLI set the level
        logging.getLogger("ppoflow").setLevel(logging.INFO)  # so the engine's progress reaches the Prefect UI
    config = effective_config(config, overrides, flow_run.scheduled_start_time, flow_run.id)
    stages = Stages(config.flow)
    # Fail before any expensive work: the tracking store answers, MLflow accepts the release names,
    # and a Hub push could happen (online, with a token).
    tracking.check_reachable(tracking.resolve_tracking_uri())
    tracking.check_release_names(config.tracking)
    check_push(config.tracking)
    if config.tracking.promotion is not None and config.tracking.log_model:
        approval.record_expired(tracking.resolve_tracking_uri(), config.tracking.registered_model_name)

    # One run per output_dir at a time: a second one waits here, then finds its stages Cached.
    with output_dir_lock(config.output_dir, config.flow.lock_timeout_seconds):
        plan = staged(stages.configure, config)
        models = staged(stages.load_models, plan, str(flow_run.id) if names_registry_alias(config.models) else None)
        data = staged(stages.prepare_dataset, plan, models)
        with mlflow_run(plan, models, data) as run:
            start = staged(stages.init_trainer, plan, models, data)
            final = staged(stages.train_ppo, plan, models, data, start, run.run_id)
            release = staged(stages.save_and_evaluate, plan, models, data, final, run.run_id)
            publish_artifacts(plan, models, data, release, run)
            decided = approval.await_approval(plan, release, run)  # with tracking.promotion.approval: required
            if decided is not release:
                publish_summary(plan, models, data, decided)
                release = decided
            announce_decision(release, run)
        return summary(plan, release, run.experiment_id)


def staged(task: Task, *args: Any) -> Any:
    """One stage: its task run between the two console lines (`ppoflow.console`), `Cached` when the
    result was reused. A failed stage raises here, as the task call would."""
    began = console.stage_started(task.name)
    state = task(*args, return_state=True)
    result = state.result()
    console.stage_finished(task.name, result, began, cached=state.name == "Cached")
    return result


def effective_config(
    config: RunConfig, overrides: list[str] | None, scheduled_start: datetime, flow_run_id: Any
) -> RunConfig:
    """`config` with the overrides applied, output_dir's `{date}` and `{flow_run}` expanded from the flow
    run's scheduled start and id (both fixed for the flow run's life: its retries land in the same
    workspace), and local paths made absolute: a flow run's cache keys and config hash must not depend
    on the directory it happens to start in."""
    if overrides:
        config = build_config(config.model_dump(mode="json"), overrides)
    return expand_output_dir(config, scheduled_start=scheduled_start, flow_run=str(flow_run_id)).with_absolute_paths()


@contextmanager
def mlflow_run(plan: RunPlan, models: ModelManifest, data: DatasetManifest) -> Iterator[tracking.TrackingRun]:
    """The MLflow run of this training (config hash and training fingerprint: a new partition or a moved
    alias is a new run, a retry or re-run continues its own), with the plan, the models' lineage and
    the datasets logged (idempotently), tagged with this flow run, ended FINISHED when the flow body
    gets through and FAILED when a stage fails."""
    run = tracking.open_run(plan, training_fingerprint(models, data.fingerprint))
    ui_url = flow_run.ui_url if PREFECT_UI_URL.value() else None
    run.tag_flow_run(flow_run.id, flow_run.name, deployment.name, ui_url)
    run.log_plan(plan)
    run.log_models(models)
    run.log_datasets(data, lambda split_dir: load_prompts(split_dir).to_pandas())
    if plan.config.tracking.system_metrics:
        run.start_system_metrics()
    try:
        yield run
    except Pause:  # suspended awaiting approval: the training is done, the decision is recorded when it comes
        run.finish("FINISHED")
        raise
    except BaseException as exc:
        run.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    run.finish("FINISHED")


def publish_artifacts(
    plan: RunPlan, models: ModelManifest, data: DatasetManifest, release: Release, run: tracking.TrackingRun
) -> None:
    """Prefect artifacts of this flow run: where the MLflow run is (a link to its page in the tracking
    server's UI, or how to browse a local store), a summary, sample completions."""
    page = alerts.mlflow_page(run.tracking_uri, run.experiment_id, run.run_id)
    if page is not None:
        create_link_artifact(
            key="mlflow-run",
            link=page,
            link_text=f"MLflow run {run.run_id}",
            description="The MLflow run of this training job",
        )
    else:
        uri = redact(run.tracking_uri)
        create_markdown_artifact(
            key="mlflow-run",
            description="The MLflow run of this training job",
            markdown=(
                f"MLflow run `{run.run_id}` in `{uri}`. Browse it with\n\n"
                f"```\nmlflow ui --backend-store-uri {uri}\n```\n"
            ),
        )
    publish_summary(plan, models, data, release)
    rows = [sample_row(row) for row in read_jsonl(plan.output_dir / SAMPLES_FILE)]
    if rows:
        create_table_artifact(
            key="sample-completions", table=rows, description="Policy and reference completions of eval prompts"
        )


def publish_summary(plan: RunPlan, models: ModelManifest, data: DatasetManifest, release: Release) -> None:
    create_markdown_artifact(
        key="rlhf-ppo-summary", markdown=summary_markdown(plan, models, data, release), description="Run summary"
    )


def announce_decision(release: Release, run: tracking.TrackingRun) -> None:
    """The promotion gate's decision as a Prefect event (`ppoflow.promotion.promoted` or `.rejected`),
    for the alerts of `make serve ALERT_WEBHOOK=...` and for automations of the user's own."""
    if release.promotion and not release.promotion.get("awaiting_approval"):
        alerts.emit_promotion(
            flow_run.name,
            release.promotion,
            release.registered_model,
            release.registered_version,
            alerts.flow_run_page(flow_run.id),
            alerts.mlflow_page(run.tracking_uri, run.experiment_id, run.run_id),
        )


SAMPLE_COLUMNS = ("prompt", "policy_completion", "ref_completion", "policy_score", "ref_score")


def sample_row(row: dict[str, Any]) -> dict[str, Any]:
    """A samples.jsonl row for the table: the policy's completion before the reference's, scores to
    4 significant digits."""
    ordered = {key: row[key] for key in SAMPLE_COLUMNS if key in row} | row
    return {
        key: float(f"{value:.4g}") if key.endswith("_score") and isinstance(value, float) else value
        for key, value in ordered.items()
    }


def summary_markdown(plan: RunPlan, models: ModelManifest, data: DatasetManifest, release: Release) -> str:
    last = final_metrics(plan.output_dir)
    lines = [
        f"# PPO run `{plan.config_hash}`",
        "",
        f"Workspace `{plan.output_dir}`; {plan.batch.num_updates} updates of {plan.batch.batch_size} episodes.",
        "",
        "| model | source | sha256 | parameters |",
        "|---|---|---|---|",
    ]
    for source in (models.policy, models.ref, models.reward, models.value):
        if source is not None:
            lines.append(
                f"| {source.role} | `{redact(source.source)}` | `{source.sha256}` | {source.num_parameters:,} |"
            )
    lines += [
        "",
        f"Prompts: {data.rows_read} read, {data.rows_kept} kept ({data.dropped_too_long} "
        f"too long, {data.dropped_empty} empty), {data.train_rows} train / {data.eval_rows} "
        f"eval; train digest `{data.train_digest}`, eval digest `{data.eval_digest}`.",
    ]
    if data.partitions:
        lines += ["", "| partition | date | sha256 | rows |", "|---|---|---|---|"]
        lines += [
            f"| `{partition.path.name}` | {partition.date or '—'} | `{partition.sha256}` | {partition.rows} |"
            for partition in data.partitions
        ]
    lines += [
        "",
        "| metric | value |",
        "|---|---|",
    ]
    shown = {f"final {key}": value for key, value in last.items() if key.startswith(("objective/", "loss/"))}
    shown |= {f"eval {key}": value for key, value in release.eval_metrics.items()}
    lines += [f"| {key} | {value:.4g} |" for key, value in shown.items() if isinstance(value, (int, float))]
    lines += ["", f"Trained policy sha256 `{release.policy_sha256}`."]
    if release.mlflow_run_id:
        lines += ["", f"MLflow run `{release.mlflow_run_id}`."]
    if release.registered_model:
        lines += [
            "",
            f"Registered model **{release.registered_model}** version "
            f"**{release.registered_version}** (`{release.model_uri}`).",
        ]
    if release.promotion:
        lines += ["", f"Promotion gate (@{release.promotion['alias']}): **{release.promotion['decision']}**."]
    if release.hub_commit_url:
        lines += ["", f"Pushed to the Hugging Face Hub: {release.hub_commit_url}"]
    return "\n".join(lines) + "\n"


def summary(plan: RunPlan, release: Release, mlflow_experiment_id: str) -> dict[str, Any]:
    """The JSON summary `ppoflow run` prints (the CLI adds wall seconds)."""
    return {
        **run_summary(plan, release),
        "prefect_flow_run_id": str(flow_run.id),
        "mlflow_experiment_id": mlflow_experiment_id,
        "mlflow_run_id": release.mlflow_run_id,
        "model_uri": release.model_uri,
        "registered_model": {"name": release.registered_model, "version": release.registered_version},
        "hub_commit_url": release.hub_commit_url,
        "promotion": release.promotion,
    }
