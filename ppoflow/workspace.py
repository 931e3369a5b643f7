"""A run's workspace (its output_dir): the files a run writes at its top, named once (docs/RUNS.md:
what a run writes), and how their JSON-lines files are read. No MLflow or Prefect import: the engine,
the tracking code and the flow's tasks all read these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"  # one JSON object per PPO update (rank 0 writes it)
SPOOL_FILE = "mlflow_spool.jsonl"  # updates not yet acknowledged by the tracking server
EVAL_FILE = "eval.json"  # stage 6's evaluation report
SAMPLES_FILE = "samples.jsonl"  # stage 6's sample completions


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file the run wrote whole (blank lines skipped); [] when it is not there."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
