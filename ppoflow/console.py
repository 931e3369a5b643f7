"""What the console says at the default log level: one line per stage as it starts and as it ends
(`[2/6] load_models: 4 models, 3.1 s`, a reused result said as `Cached`), training's own progress bar,
the warnings that matter, and nothing from third-party progress bars or notices.
`--log-level DEBUG` shows everything."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("ppoflow")

STAGES = ("configure", "load_models", "prepare_dataset", "init_trainer", "train_ppo", "save_and_evaluate")

# Loggers whose INFO lines are library chatter here: MLflow's table creation and system-metrics notices,
# alembic's migrations, matplotlib's font cache.
CHATTY_LOGGERS = ("mlflow", "alembic", "matplotlib", "httpx", "urllib3", "filelock")
# Prefect's task-run logger: its INFO lines ("Finished in state Completed()" of each task, which the stage
# lines say with the stage's name and time; the ranks' lines a task relays) belong in the task's log in the
# Prefect UI, not on the console. Its level stays as it is, so its API handler still gets them.
TASK_RUN_LOGGER = "prefect.task_runs"

T = TypeVar("T")


def quiet_libraries(level: int) -> None:
    """Above DEBUG: no third-party progress bars (transformers' "Loading weights" and "Writing model
    shards", datasets' map and save bars, the Hub's downloads), libraries' notices at WARNING. The
    environment variables reach the processes a run starts (accelerate launch) too."""
    if level <= logging.DEBUG:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers and datasets too
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level from it when imported
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # DeepSpeed (which accelerate imports when it is installed) warns at import that it found no GPU.
    logging.getLogger("DeepSpeed").addFilter(_Without("Setting accelerator to CPU"))


def console_handler(level: int) -> logging.Handler:
    """The console's handler (stderr): above DEBUG it leaves out Prefect's task-run lines below WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    if level > logging.DEBUG:
        handler.addFilter(_QuietTaskRuns())
    return handler


class _QuietTaskRuns(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(TASK_RUN_LOGGER)


class _Without(logging.Filter):
    """Drops the records whose message starts with one of `starts`."""

    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def stage_started(name: str) -> float:
    log.info("[%d/%d] %s …", STAGES.index(name) + 1, len(STAGES), name)
    return time.perf_counter()


def stage_finished(name: str, result: Any, began: float, cached: bool = False) -> None:
    said = describe(result)
    if cached:
        said = f"Cached, reused ({said})" if said else "Cached, reused"
    log.info("[%d/%d] %s: %s, %.1f s", STAGES.index(name) + 1, len(STAGES), name, said, time.perf_counter() - began)


def run_stage(name: str, call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` between its stage's two lines."""
    began = stage_started(name)
    result = call(*args)
    stage_finished(name, result, began)
    return result


def describe(result: Any) -> str:
    """A stage's result in a few words: what a person at the console wants to know of it."""
    from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, Release, RunPlan

    if isinstance(result, RunPlan):
        return f"{result.batch.num_updates} updates of {result.batch.batch_size} episodes"
    if isinstance(result, ModelManifest):
        count = sum(source is not None for source in (result.policy, result.ref, result.reward, result.value))
        return f"{count} models"
    if isinstance(result, DatasetManifest):
        return f"{result.train_rows:,} train and {result.eval_rows:,} eval prompts"
    if isinstance(result, CheckpointManifest):
        return f"update {result.update} of {result.num_updates}, {result.episode:,} episodes"
    if isinstance(result, Release):
        parts = [f"win rate {result.eval_metrics['win_rate']:.2f}"] if "win_rate" in result.eval_metrics else []
        if result.registered_version:
            parts.append(f"{result.registered_model} v{result.registered_version}")
        if result.promotion:
            parts.append(str(result.promotion.get("decision", "")).split(":")[0])
        return ", ".join(parts)
    return ""
