"""Deploy-time steps for deployments/prefect.yaml (Prefect runs them inside `prefect deploy`)."""

from __future__ import annotations

from typing import Any


def load_run_config(path: str) -> dict[str, Any]:
    """`{"config": ...}`: the run config file at `path` (relative to where you deploy from), validated
    like `ppoflow run --config` does, as the JSON a deployment stores for the flow's `config` parameter.

    Every field is written out, defaults included, so the deployment pins the whole config and the
    UI's run form shows all of it; a broken config file fails the deploy, not the nightly run."""
    from ppoflow.config import load_config

    return {"config": load_config(path).model_dump(mode="json")}
