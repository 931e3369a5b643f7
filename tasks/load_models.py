"""Stage 2: fingerprint policy, reference, reward and value models; prepare the shared tokenizer."""

from __future__ import annotations

from prefect import task

from ppoflow import pipeline
from ppoflow.manifests import ModelManifest, RunPlan
from ppoflow.tracking import TrackingRun
from tasks.common import STAGE_OPTIONS


@task(name="load_models", **STAGE_OPTIONS)
def load_models(plan: RunPlan, mlflow_run_id: str) -> ModelManifest:
    """The models' provenance goes to the MLflow run as lineage tags."""
    models = pipeline.load_models(plan)
    TrackingRun.attach(mlflow_run_id, output_dir=plan.output_dir).log_models(models)
    return models
