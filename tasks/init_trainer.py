"""Stage 4: the step-0 checkpoint (policy, value model from the reward model, fresh optimizer)."""

from __future__ import annotations

from prefect import task

from ppoflow import pipeline
from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, RunPlan
from ppoflow.tasks.common import STAGE_OPTIONS
from ppoflow.tasks.launch import needs_launch, run_launched


@task(name="init_trainer", **STAGE_OPTIONS)
def init_trainer(plan: RunPlan, models: ModelManifest, data: DatasetManifest) -> CheckpointManifest:
    """In this process, or (runtime.num_processes > 1) under accelerate launch: the step-0 checkpoint
    holds every process's RNG state."""
    if needs_launch(plan):
        return run_launched("init_trainer", plan, {"plan": plan, "models": models, "data": data}, CheckpointManifest)
    return pipeline.init_trainer(plan, models, data)
