"""Stage 2: fingerprint policy, reference, reward and value models; prepare the shared tokenizer."""

from __future__ import annotations

from prefect import task

from ppoflow import pipeline
from ppoflow.manifests import ModelManifest, RunPlan
from ppoflow.tasks.common import STAGE_OPTIONS


@task(name="load_models", **STAGE_OPTIONS)
def load_models(plan: RunPlan, aliases_resolved_by: str | None = None) -> ModelManifest:
    """`aliases_resolved_by` keys the cache when a model is a registry alias (`models:/NAME@ALIAS`):
    the flow passes its flow run's id, so each new flow run resolves the aliases again (the champion
    may have moved since) while its retries keep the versions it resolved first."""
    return pipeline.load_models(plan)
