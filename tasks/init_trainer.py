"""Stage 4: the step-0 checkpoint (policy, value model from the reward model, fresh optimizer)."""

from __future__ import annotations

from prefect import task

from ppoflow import pipeline
from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, RunPlan
from tasks.common import STAGE_OPTIONS


@task(name="init_trainer", **STAGE_OPTIONS)
def init_trainer(plan: RunPlan, models: ModelManifest, data: DatasetManifest) -> CheckpointManifest:
    return pipeline.init_trainer(plan, models, data)
