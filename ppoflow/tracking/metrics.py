"""The trainer's per-update metrics callback, with a spool so training never waits for MLflow.

`TrackingRun.metrics_sink()` hands out a `MetricsSink`. It appends each update to
`OUTPUT/mlflow_spool.jsonl` and hands it to a background sender, so training never waits for or
stops because of tracking: while MLflow is unreachable the updates wait in memory and in the spool
(re-read when the run resumes after a crash) and are re-delivered, without duplicates, once it
answers again or at `flush()`.
"""

from __future__ import annotations

import json
import logging
import numbers
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from ppoflow.tracking.store import first_line, in_batches

_LOGGER = logging.getLogger(__name__)


def is_number(value: Any) -> bool:
    """A real number MLflow can log as a metric (booleans are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class MetricsSink:
    """Trainer callback: `sink(update_metrics)` logs one update's numeric values at `step=update`.

    Each update is appended to the spool file first, then sent by a background thread with
    `log_batch`, so the trainer never waits for MLflow. Points already in the run (same key and
    step, read once per key from the run's history, re-read after any failed send since a failed
    request may still have been applied) are skipped: a resumed job re-logging updates 3..6 after
    0..4 adds only 5 and 6. Failed sends stay queued (memory and spool) and are retried with
    backoff, on the next update and at `flush()`; the spool is emptied whenever everything is
    delivered and re-read when a sink is created for the same run (after a crash).
    """

    RETRY_MIN_SECONDS = 1.0
    RETRY_MAX_SECONDS = 30.0

    def __init__(self, client: mlflow.MlflowClient, run_id: str, spool_path: Path):
        self._client = client
        self._run_id = run_id
        self._spool_path = Path(spool_path)
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._pending: list[dict] = self._read_spool()
        self._logged: dict[str, set[int]] = {}
        self._failing = False
        self._spool_warned = False
        self._closing = False
        self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()
        if self._pending:
            _LOGGER.info("re-delivering %d spooled metric updates from %s", len(self._pending), self._spool_path)
            self._wake.set()

    def __call__(self, update_metrics: Mapping[str, Any]) -> None:
        try:
            record = {
                "run_id": self._run_id,
                "step": int(update_metrics["update"]),
                "timestamp": int(time.time() * 1000),
                "metrics": {
                    key: float(value) for key, value in update_metrics.items() if key != "update" and is_number(value)
                },
            }
            with self._lock:
                self._append_spool(record)
                self._pending.append(record)
            self._wake.set()
        except Exception as exc:  # tracking must never stop training
            _LOGGER.warning("metrics of update %s not tracked: %s", update_metrics.get("update"), first_line(exc))

    @property
    def pending(self) -> int:
        """Updates not yet delivered."""
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait up to `timeout` seconds for delivery; False when updates stay in the spool."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.set()
                self._drained.wait(min(remaining, 2.0))
            left = len(self._pending)
        if left:
            _LOGGER.warning(
                "%d metric updates not delivered to MLflow; kept in %s for when the run resumes", left, self._spool_path
            )
        return left == 0

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then stop the sender thread."""
        delivered = self.flush(timeout)
        with self._lock:
            self._closing = True
        self._wake.set()
        self._thread.join(timeout=5.0)
        return delivered

    # -- sender thread ---------------------------------------------------------------------------

    def _send_loop(self) -> None:
        delay = self.RETRY_MIN_SECONDS
        while True:
            with self._lock:
                batch = list(self._pending)
                closing = self._closing
            if not batch:
                if closing:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            if self._send(batch):
                delay = self.RETRY_MIN_SECONDS
                with self._lock:
                    del self._pending[: len(batch)]
                    if not self._pending:
                        self._remove_spool()
                    self._drained.notify_all()
                continue
            if closing:
                return
            self._wake.wait(delay)
            self._wake.clear()
            delay = min(delay * 2, self.RETRY_MAX_SECONDS)

    def _send(self, batch: list[dict]) -> bool:
        try:
            for key in {key for record in batch for key in record["metrics"]} - self._logged.keys():
                self._logged[key] = {point.step for point in self._client.get_metric_history(self._run_id, key)}
            metrics = []
            for record in batch:
                step = record["step"]
                for key, value in record["metrics"].items():
                    if step not in self._logged[key]:
                        self._logged[key].add(step)
                        metrics.append(Metric(key, value, record["timestamp"], step))
            for chunk in in_batches(metrics, MAX_METRICS_PER_BATCH):
                self._client.log_batch(self._run_id, metrics=chunk)
        except Exception as exc:
            self._logged.clear()  # unknown what reached the store: re-read the history before retrying
            if not self._failing:
                _LOGGER.warning(
                    "MLflow did not take metrics of updates %d..%d (%s); buffering them in memory and %s, retrying",
                    batch[0]["step"],
                    batch[-1]["step"],
                    first_line(exc),
                    self._spool_path,
                )
            self._failing = True
            return False
        if self._failing:
            _LOGGER.info("MLflow answers again: delivered %d buffered metric updates", len(batch))
            self._failing = False
        return True

    # -- spool -----------------------------------------------------------------------------------

    def _append_spool(self, record: dict) -> None:
        try:
            self._spool_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._spool_path, "a", encoding="utf-8") as spool:
                spool.write(json.dumps(record) + "\n")
        except OSError as exc:
            if not self._spool_warned:
                _LOGGER.warning(
                    "cannot write the metrics spool %s (%s); buffering in memory only", self._spool_path, exc.strerror
                )
                self._spool_warned = True

    def _remove_spool(self) -> None:
        try:
            self._spool_path.unlink(missing_ok=True)
        except OSError as exc:
            _LOGGER.warning("cannot remove the delivered metrics spool %s (%s)", self._spool_path, exc.strerror)

    def _read_spool(self) -> list[dict]:
        if not self._spool_path.is_file():
            return []
        records = []
        for number, line in enumerate(self._spool_path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                _LOGGER.warning("skipping unreadable line %d of %s (cut short by a crash?)", number, self._spool_path)
                continue
            if record.get("run_id") == self._run_id:
                records.append(record)
            else:
                _LOGGER.warning("dropping a spooled update of another MLflow run (%s)", record.get("run_id"))
        return records
