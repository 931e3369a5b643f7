"""Stage 1: validate everything cheap to check, derive the batch plan, claim the workspace."""

from __future__ import annotations

from prefect import task

from ppoflow import pipeline
from ppoflow.config import RunConfig
from ppoflow.manifests import RunPlan
from ppoflow.tasks.common import STAGE_OPTIONS


@task(name="configure", **STAGE_OPTIONS)
def configure(config: RunConfig) -> RunPlan:
    return pipeline.configure(config)
