"""What the six stage tasks share: a cache that never trusts a stale manifest, the retry rule, run names.

Caching. A stage's cache key is its inputs (pydantic manifests, hashed as JSON: the same bytes in
every process) plus the task's source, never the flow run id, so any later flow run with the same
inputs reuses the result. Results are persisted as JSON records in `config.flow.result_storage`
(default `.ppoflow/prefect-results`). A stored manifest is only a hit while `is_intact()` holds:
when its files are gone or changed, the key moves to the next generation (see `IntactManifests`)
and the stage runs again. The key also holds ppoflow's version and a digest of the engine's source
(`provenance.engine_identity`): an upgraded or edited engine never reuses the old one's results.

Retries. Every stage retries transient failures (a crash, a lost connection, an injected fault)
with the backoff of `config.flow` (`RetryDelays`); a `PpoflowError` (bad config, bad data, a model
that does not fit its role) is a user error that no retry can fix, so it fails at once with its message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.results import ResultStore
from prefect.runtime import task_run
from prefect.states import State
from prefect.utilities.hashing import hash_objects

from ppoflow.config import FlowConfig
from ppoflow.errors import PpoflowError
from ppoflow.hashing import remembered_digests
from ppoflow.manifests import Manifest
from ppoflow.provenance import engine_identity
from ppoflow.tracking import run_name

log = logging.getLogger(__name__)

DEFAULT_RESULT_STORAGE = Path(".ppoflow/prefect-results")


@dataclass
class IntactManifests(CachePolicy):
    """INPUTS + TASK_SOURCE + the engine's identity, where a stored manifest whose files are missing or
    changed is no hit.

    Prefect counts any record stored under the key as a hit, so the check happens while the key is
    computed: a record at the key whose manifest is not intact sends the key on to
    `hash(key, stale manifest)`, and so on, until a key without a record (the stage runs and stores
    its fresh manifest there) or one with an intact manifest (a hit). The walk is deterministic, so
    the next flow run follows the same chain to the fresh result; nothing is deleted, and a stale
    record whose files come back unchanged is valid again. A workspace retrained every night on new
    partitions grows stage 3's chain by one a night; within one walk each file is hashed once.
    """

    base: CachePolicy = field(default_factory=lambda: INPUTS + TASK_SOURCE)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        key = self.base.compute_key(task_ctx=task_ctx, inputs=inputs, flow_parameters=flow_parameters, **kwargs)
        if key is not None:
            key = hash_objects(key, engine_identity(), raise_on_failure=True)
        store = task_ctx.result_store if task_ctx else None
        with remembered_digests():  # the stale manifests of a long chain check the same files
            while key is not None and store is not None and store.exists(key):
                stale = _stale_manifest(store, key)
                if stale is None:
                    return key
                log.warning(
                    "%s: the cached result's files are missing or changed — running the stage again", task_ctx.task.name
                )
                key = hash_objects(key, stale, raise_on_failure=True)
        return key


def _stale_manifest(store: ResultStore, key: str) -> Any:
    """None when the record at `key` can be reused; else what to fold into the next key."""
    try:
        cached = store.read(key).result
    except Exception as exc:  # unreadable record (another serializer, a removed class): never trusted
        return f"unreadable: {type(exc).__name__}"
    if isinstance(cached, Manifest) and not _intact(cached):
        return cached
    return None


def _intact(manifest: Manifest) -> bool:
    try:
        return manifest.is_intact()
    except (PpoflowError, OSError):  # too damaged to check, e.g. a checkpoint without its manifest.json
        return False


def retry_unless_user_error(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect's `retry_condition_fn`: retry anything but a `PpoflowError` (its `retryable` is False)."""
    try:
        state.result()
    except Exception as exc:
        return getattr(exc, "retryable", True)
    return True


class UserErrorsWithoutTraceback(logging.Filter):
    """Drops the traceback Prefect logs with a failed flow or task run when the exception is a
    refusal of ppoflow's (`PpoflowError`): its message already names the field and the fix, and the
    console and the Prefect UI then show that line instead of twenty lines of engine frames. Other
    exceptions keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PpoflowError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_error_tracebacks() -> None:
    """Install `UserErrorsWithoutTraceback` on Prefect's flow-run and task-run loggers (once)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, UserErrorsWithoutTraceback) for existing in logger.filters):
            logger.addFilter(UserErrorsWithoutTraceback())


def result_storage(flow: FlowConfig) -> Path:
    """An absolute path (Prefect reads a plain string as a storage block slug)."""
    return Path(flow.result_storage or DEFAULT_RESULT_STORAGE).expanduser().resolve()


class RetryDelays(float):
    """The backoff of `config.flow.retry_delay_seconds` as a stage's `retry_delay_seconds`: a number
    (the first delay) to the task run's recorded policy, a sequence of delays to the task engine.

    Prefect records a task's `retry_delay_seconds` as its task runs' `empirical_policy.retry_delay`,
    and its UI formats that field as a number of seconds: a list shows as "Retry Delay NaNs". As a
    number, a plain float would lose the backoff; the engine indexes a `Sequence` by the attempt
    (`delays[min(retry, len - 1)]`, the last repeated), so this float is one too, and the UI shows
    the first delay while retry N waits delay N.
    """

    delays: tuple[float, ...]

    def __new__(cls, delays: Sequence[float]) -> RetryDelays:
        value = super().__new__(cls, delays[0] if delays else 0.0)
        value.delays = tuple(float(delay) for delay in delays)
        return value

    def __getitem__(self, index: int) -> float:
        return self.delays[index]

    def __len__(self) -> int:
        return len(self.delays)

    def __bool__(self) -> bool:  # true when it holds delays, as the list was (the engine asks)
        return bool(self.delays)

    def __repr__(self) -> str:
        return f"RetryDelays({list(self.delays)})"

    def __getnewargs__(self) -> tuple[tuple[float, ...]]:  # copies and pickles keep every delay
        return (self.delays,)


Sequence.register(RetryDelays)


def flow_options(flow: FlowConfig) -> dict[str, Any]:
    """The `with_options` a flow run applies to every stage: retries, backoff, where results live."""
    return {
        "retries": flow.retries,
        "retry_delay_seconds": RetryDelays(flow.retry_delay_seconds),
        "result_storage": result_storage(flow),
    }


def stage_run_name(parameters: dict[str, Any]) -> str:
    """`load_models[policy-3f2a9c01]`: the stage, the policy model's name and the config hash."""
    plan = parameters.get("plan")
    config = plan.config if plan is not None else parameters["config"]
    config_hash = plan.config_hash if plan is not None else config.config_hash()
    return f"{task_run.task_name}[{run_name(config, config_hash)}]"


STAGE_OPTIONS: dict[str, Any] = {
    "cache_policy": IntactManifests(),
    "persist_result": True,
    "result_serializer": "json",
    "retry_condition_fn": retry_unless_user_error,
    "task_run_name": stage_run_name,
}
