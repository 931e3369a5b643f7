"""Stage 3: tokenize, filter and split the prompts once, into the run workspace."""

from __future__ import annotations

from prefect import task

from ppoflow import pipeline
from ppoflow.data import load_prompts
from ppoflow.manifests import DatasetManifest, ModelManifest, RunPlan
from ppoflow.tracking import TrackingRun
from tasks.common import STAGE_OPTIONS


@task(name="prepare_dataset", **STAGE_OPTIONS)
def prepare_dataset(plan: RunPlan, models: ModelManifest, mlflow_run_id: str) -> DatasetManifest:
    """Both splits go to the MLflow run as dataset inputs, with the manifest's digests."""
    data = pipeline.prepare_dataset(plan, models)
    train, evaluation = (load_prompts(split).to_pandas() for split in (data.train_dir, data.eval_dir))
    TrackingRun.attach(mlflow_run_id, output_dir=plan.output_dir).log_datasets(data, train, evaluation)
    return data
