"""Stage 6: the trained policy in Hugging Face format, its evaluation, and its MLflow release."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import task

from ppoflow import pipeline
from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, Release, RunPlan
from ppoflow.tracking import TrackingRun, log_release
from tasks.common import STAGE_OPTIONS


@task(name="save_and_evaluate", **STAGE_OPTIONS)
def save_and_evaluate(plan: RunPlan, models: ModelManifest, data: DatasetManifest, final: CheckpointManifest, mlflow_run_id: str) -> Release:
    """The release names the MLflow run, the logged model and its registry version (with the alias)."""
    release = pipeline.save_and_evaluate(plan, models, data, final)
    tracking = plan.config.tracking
    return log_release(
        TrackingRun.attach(mlflow_run_id, output_dir=plan.output_dir),
        release,
        samples=pd.DataFrame(read_jsonl(plan.output_dir / "samples.jsonl")),
        metrics_history=read_jsonl(plan.output_dir / "metrics.jsonl"),
        eval_report=release.eval_metrics,
        policy_dir=release.merged_dir or release.policy_dir,
        registered_model_name=tracking.registered_model_name,
        alias=tracking.alias,
        log_model=tracking.log_model,
    )


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
