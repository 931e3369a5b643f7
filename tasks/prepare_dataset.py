"""Stage 3: tokenize, filter and split the prompts once, into the run workspace."""

from __future__ import annotations

from prefect import task

from ppoflow import pipeline
from ppoflow.manifests import DatasetManifest, ModelManifest, RunPlan
from ppoflow.tasks.common import STAGE_OPTIONS


@task(name="prepare_dataset", **STAGE_OPTIONS)
def prepare_dataset(plan: RunPlan, models: ModelManifest) -> DatasetManifest:
    """A workspace holding another training (other partitions, another model version) has it archived
    (`pipeline.archive_training`) before the new data is written."""
    return pipeline.prepare_dataset(plan, models)
