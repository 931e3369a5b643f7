"""Stage 5: PPO updates from the newest intact checkpoint to the last one.

A retried or re-run stage resumes where the crashed attempt last checkpointed (the engine finds the
checkpoint; the data order and RNG states make the result bitwise that of an uninterrupted run).
Each update's metrics go to the MLflow run and move a Prefect progress artifact; both callbacks run
on the task's own thread, inside the trainer loop. With runtime.num_processes > 1 the stage runs under
accelerate launch (`ppoflow.tasks.launch`): the main rank sends the metrics to MLflow, and the task moves the
progress artifact from `metrics.jsonl`.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from ppoflow import pipeline
from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, RunPlan
from ppoflow.tasks.common import STAGE_OPTIONS
from ppoflow.tasks.launch import needs_launch, run_launched
from ppoflow.tracking import TrackingRun

log = logging.getLogger(__name__)


@task(name="train_ppo", **STAGE_OPTIONS)
def train_ppo(
    plan: RunPlan, models: ModelManifest, data: DatasetManifest, start: CheckpointManifest, mlflow_run_id: str
) -> CheckpointManifest:
    """`start` (the step-0 checkpoint) orders the stages and keys the cache; training itself resumes
    from the newest intact checkpoint on disk. Returns the final checkpoint."""
    if needs_launch(plan):
        return run_launched(
            "train",
            plan,
            {"plan": plan, "models": models, "data": data},
            CheckpointManifest,
            mlflow_run_id=mlflow_run_id,
            on_metrics=TrainingProgress(plan),
        )
    sink = TrackingRun.attach(mlflow_run_id, output_dir=plan.output_dir).metrics_sink()
    try:
        return pipeline.train(plan, models, data, callbacks=[sink, TrainingProgress(plan)])
    finally:
        sink.close()  # delivers what is buffered (the rest waits in the spool for the resume)


class TrainingProgress:
    """A Prefect progress artifact at `update / num_updates`; a failed update of it never stops training."""

    def __init__(self, plan: RunPlan):
        self.num_updates = plan.batch.num_updates
        self.artifact_id = create_progress_artifact(
            progress=0.0, key="ppo-training-progress", description=f"PPO updates of config {plan.config_hash}"
        )

    def __call__(self, metrics: dict[str, Any]) -> None:
        update = metrics["update"]
        description = (
            f"update {update}/{self.num_updates}: score "
            f"{metrics['objective/scores']:.3f}, KL {metrics['objective/kl']:.3f}"
        )
        try:
            update_progress_artifact(
                self.artifact_id, progress=100.0 * update / self.num_updates, description=description
            )
        except Exception as exc:  # the Prefect API is down: training goes on, the UI catches up later
            log.warning("progress artifact not updated: %s", exc)
