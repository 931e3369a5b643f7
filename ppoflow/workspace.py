"""A run's workspace (its output_dir): the files a run writes at its top, named once (docs/RUNS.md:
what a run writes), and how their JSON-lines files are read. No MLflow or Prefect import: the engine,
the tracking code and the flow's tasks all read these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ppoflow.errors import ConfigError

METRICS_FILE = "metrics.jsonl"  # one JSON object per PPO update (rank 0 writes it)
SPOOL_FILE = "mlflow_spool.jsonl"  # updates not yet acknowledged by the tracking server
EVAL_FILE = "eval.json"  # stage 6's evaluation report
SAMPLES_FILE = "samples.jsonl"  # stage 6's sample completions
HEAD_TO_HEAD_FILE = "head-to-head.jsonl"  # the promotion gate's: the policy's and the alias holder's completions


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file the run wrote whole (blank lines skipped); [] when it is not there."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_resume(
    where: Path,
    state: dict[str, Any],
    *,
    config_hash: str,
    differences: str = "",
    world_size: int | None = None,
    training: str | None = None,
    sharding: dict[str, Any] | None = None,
) -> None:
    """The one check that a workspace's checkpoint continues this run, from its `state.json` (read,
    never hashed: stages 4 and 5 verify a checkpoint before they load it). The facts given are
    checked, the first that differs refused in one line naming `output_dir`:

    - `config_hash`: checkpoints of another config (`differences`: what differs, when it can be told);
    - `world_size`: the data order and RNG states of a checkpoint are per process: as many processes;
    - `training`: the models and data it was trained from (`manifests.training_fingerprint`), so that
      last night's training is not "resumed" as tonight's (older checkpoints, without it, pass);
    - `sharding`: how it was trained (`Backend.sharding_state`): the optimizer state is keyed by
      parameter name with FSDP, a list of per-process partitions with ZeRO, by position otherwise.

    Stage 1 checks the config, the processes and the sharding; stages 4 and 5 the training too; the
    trainer the config and the sharding of the checkpoint it loads."""
    written = state.get("config_hash")
    if written != config_hash:
        raise ConfigError(
            "output_dir",
            f"{where} holds checkpoints of another config ({written}{differences})",
            "use a new output_dir for a changed config, or delete the old run",
        )
    processes = state.get("world_size", 1)
    if world_size is not None and processes != world_size:
        raise ConfigError(
            "output_dir",
            f"{where} holds checkpoints written by {processes} process(es), and this run has {world_size}",
            f"resume with {processes} process(es) (runtime.num_processes, or accelerate launch --num_processes), "
            "or use a new output_dir",
        )
    trained_on = state.get("training_fingerprint")
    if training is not None and trained_on is not None and trained_on != training:
        raise ConfigError(
            "output_dir",
            f"{where} holds a training of other models or data (training "
            f"fingerprint {trained_on[:16]}, this run's {training[:16]})",
            "run stage 3 (prepare_dataset) first, which archives it, or use a new output_dir",
        )
    if sharding is not None:
        _check_sharding(where, state, **sharding)


def _check_sharding(where: Path, state: dict[str, Any], fsdp: bool, zero_stage: int | None) -> None:
    written = bool(state.get("fsdp", False))  # older checkpoints, without the fields, are of unsharded training
    if written != fsdp:
        raise ConfigError(
            "output_dir",
            f"{where} holds checkpoints written with runtime.fsdp {str(written).lower()} and this run has "
            f"{str(fsdp).lower()}",
            f"set runtime.fsdp: {str(written).lower()} to resume it, or use a new output_dir",
        )
    written_stage = state.get("zero_stage")
    if written_stage != zero_stage:

        def name(stage):
            return f"DeepSpeed ZeRO-{stage}" if stage else "no DeepSpeed"

        raise ConfigError(
            "output_dir",
            f"{where} holds checkpoints written with {name(written_stage)} and this run has {name(zero_stage)}",
            "resume it with the accelerate config that wrote it (runtime.accelerate_config), or use a new output_dir",
        )
