"""Stage 6: the trained policy in Hugging Face format, its evaluation, its MLflow release, the
promotion gate (`tracking.promotion`), and (with `tracking.push_to_hub`) its push to the Hugging
Face Hub, after the registry has the version."""

from __future__ import annotations

import json

import pandas as pd
from prefect import task

from ppoflow import pipeline
from ppoflow.atomic import write_text_atomic
from ppoflow.hub import push_policy
from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, Release, RunPlan
from ppoflow.tasks.common import STAGE_OPTIONS
from ppoflow.tracking import TrackingRun, describe_release, log_release
from ppoflow.tracking.promotion import gate
from ppoflow.workspace import HEAD_TO_HEAD_FILE, METRICS_FILE, SAMPLES_FILE, read_jsonl


@task(name="save_and_evaluate", **STAGE_OPTIONS)
def save_and_evaluate(
    plan: RunPlan, models: ModelManifest, data: DatasetManifest, final: CheckpointManifest, mlflow_run_id: str
) -> Release:
    """The release names the MLflow run, the logged model and its registry version (with the alias),
    and the Hub commit when it was pushed; the run and the version get their descriptions last."""
    release = pipeline.save_and_evaluate(plan, models, data, final)
    tracking = plan.config.tracking
    run = TrackingRun.attach(mlflow_run_id, output_dir=plan.output_dir)
    release = log_release(
        run,
        release,
        samples=pd.DataFrame(read_jsonl(plan.output_dir / SAMPLES_FILE)),
        metrics_history=read_jsonl(plan.output_dir / METRICS_FILE),
        eval_report=release.eval_metrics,
        policy_dir=release.merged_dir or release.policy_dir,
        registered_model_name=tracking.registered_model_name,
        alias=tracking.alias,
        log_model=tracking.log_model,
        policy_source=models.policy.registry_uri or models.policy.source,
    )
    if tracking.log_model and tracking.promotion is not None:
        release = promote(plan, models, data, release, run)
    if tracking.push_to_hub:
        pushed = push_policy(plan, data, release)
        run.set_tags({"ppoflow.hub.repo_id": pushed.repo_id, "ppoflow.hub.commit": pushed.commit_url})
        release = release.model_copy(update={"hub_commit_url": pushed.commit_url})
    describe_release(run, release, models, data)  # last: with the gate's decision and the Hub commit
    return release


def promote(plan: RunPlan, models: ModelManifest, data: DatasetManifest, release: Release, run: TrackingRun) -> Release:
    """The promotion gate (`ppoflow.tracking.promotion`); its decision also goes into eval.json and the release."""
    policy_dir = release.merged_dir or release.policy_dir
    head_to_head = plan.output_dir / HEAD_TO_HEAD_FILE  # written when the gate evaluates against a holder
    decision = gate(
        run,
        plan.config.tracking.promotion,
        name=release.registered_model,
        version=release.registered_version,
        eval_metrics=release.eval_metrics,
        evaluate=lambda baseline_dir: pipeline.evaluate_against(plan, models, data, policy_dir, baseline_dir),
        fetch_root=plan.output_dir / "registry",
        reference_uri=models.ref.registry_uri if models.ref is not None else None,
    )
    if head_to_head.is_file() and decision.get("against", "").startswith("models:/"):
        run.client.log_artifact(run.run_id, str(head_to_head), "eval")
    report = {**release.eval_metrics, "promotion": decision}
    write_text_atomic(release.eval_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    run.client.log_dict(run.run_id, report, "eval/eval.json")
    return release.model_copy(update={"promotion": decision})
