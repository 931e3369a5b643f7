"""The deployments as deployments/prefect.yaml declares them: what the unit test of the files and the
integration test of the deployed server both compare with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ppoflow.deployments import serve


def declared() -> dict[str, dict[str, Any]]:
    """The deployments as deployments/prefect.yaml declares them, by name."""
    return {entry["name"]: entry for entry in yaml.safe_load(serve.PREFECT_FILE.read_text())["deployments"]}


def config_file(spec: dict[str, Any]) -> Path:
    """The run config file a deployment's build step loads into its `config` parameter."""
    (step,) = spec["build"]
    assert spec["parameters"]["config"] == f"{{{{ {step['ppoflow.deployments.steps.load_run_config']['id']}.config }}}}"
    return serve.REPO_ROOT / step["ppoflow.deployments.steps.load_run_config"]["path"]
