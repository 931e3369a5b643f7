"""The files a run writes at the top of its output_dir, named once (docs/RUNS.md: what a run writes). No
MLflow or Prefect import: the engine, the tracking code and the flow's tasks all read these."""

from __future__ import annotations

METRICS_FILE = "metrics.jsonl"  # one JSON object per PPO update (rank 0 writes it)
SPOOL_FILE = "mlflow_spool.jsonl"  # updates not yet acknowledged by the tracking server
EVAL_FILE = "eval.json"  # stage 6's evaluation report
SAMPLES_FILE = "samples.jsonl"  # stage 6's sample completions
