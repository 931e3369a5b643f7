"""The engine never loads MLflow or Prefect: `ppoflow train` runs without the orchestration layer.

Only `ppoflow.tracking` (the MLflow door, used by the flow's tasks) may import MLflow. Each check
runs in a fresh interpreter, so nothing another test imported counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[2]

IMPORT_EVERY_ENGINE_MODULE = """
import importlib, json, pkgutil, sys

def engine_modules(package):
    # not pkgutil.walk_packages: it imports every package it descends into, ppoflow.tracking too
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if module.name != "ppoflow.tracking":
            imported = importlib.import_module(module.name)
            yield module.name
            if module.ispkg:
                yield from engine_modules(imported)

names = list(engine_modules(importlib.import_module("ppoflow")))
loaded = sorted({name.split(".")[0] for name in sys.modules} & {"mlflow", "prefect"})
print(json.dumps({"imported": names, "loaded": loaded}))
"""

# MLflow and Prefect made unimportable (a None entry in sys.modules: `import` raises ImportError and
# importlib.util.find_spec says "not installed"), as on a machine without them: `ppoflow train` must
# still run. (Merely not importing them would not do: with deepspeed installed, transformers'
# save_pretrained imports deepspeed through accelerate, and deepspeed imports MLflow when it can.)
TRAIN_WITH_THE_PPOFLOW_COMMAND = """
import json, sys
sys.modules["mlflow"] = sys.modules["prefect"] = None
from ppoflow.flows.cli import main

code = main(["train", "--config", sys.argv[1]])
imported = {name.split(".")[0] for name, module in sys.modules.items() if module is not None}
loaded = sorted(imported & {"mlflow", "prefect"})
print(json.dumps({"code": code, "loaded": loaded}))
"""


def run_fresh(code: str, *args: str, cwd: Path) -> dict:
    """Run `code` in a new interpreter; returns the JSON object on its last stdout line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPOSITORY)}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_engine_module_imports_mlflow_or_prefect(tmp_path):
    report = run_fresh(IMPORT_EVERY_ENGINE_MODULE, cwd=tmp_path)
    assert {"ppoflow.cli", "ppoflow.pipeline", "ppoflow.trainer", "ppoflow.redaction", "ppoflow.provenance"} <= set(
        report["imported"]
    )
    assert report["loaded"] == []


@pytest.mark.slow
def test_ppoflow_train_runs_without_mlflow_or_prefect(toy_world, tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "models": {"policy": str(toy_world / "policy"), "reward": str(toy_world / "reward")},
        "data": {"path": str(toy_world / "prompts.jsonl"), "max_prompt_length": 32, "eval_size": 8},
        "ppo": {
            "total_episodes": 8,
            "per_device_train_batch_size": 8,
            "num_mini_batches": 1,
            "num_ppo_epochs": 1,
            "local_rollout_forward_batch_size": 8,
            "response_length": 8,
            "stop_token": "eos",
            "seed": 7,
        },
        "eval": {"batch_size": 8, "sample_table_size": 2},
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))

    report = run_fresh(TRAIN_WITH_THE_PPOFLOW_COMMAND, str(config_file), cwd=tmp_path)

    assert report["code"] == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert report["loaded"] == []
