"""`ppoflow run` with tracking.push_to_hub, end to end: the real huggingface_hub client, pointed by
HF_ENDPOINT at a local stand-in for the Hub (tests/hub_endpoint.py) — huggingface.co cannot be
reached from these machines. A Hub that fails fails stage 6 in one line and keeps the registered
version; once the Hub answers, the same command pushes that version without training again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.flow.conftest import toy_flow_config
from tests.hub_endpoint import running_hub
from tests.reliability.helpers import error_lines, subprocess_env, summary_of

pytestmark = [pytest.mark.flow, pytest.mark.slow]

TOKEN = "hf_e2e_secret_write_token"
REPO = Path(__file__).resolve().parents[2]


def ppoflow_run(config_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ppoflow.flows.cli", "run", "--config", str(config_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_push_to_hub_after_registration_and_a_failing_hub_keeps_the_version(toy_world, tmp_path):
    tree = toy_flow_config(toy_world, tmp_path / "run", tmp_path / "results")
    tree["ppo"]["total_episodes"] = 16
    tree["tracking"] |= {"push_to_hub": True, "hub_repo_id": "my-org/toy-policy", "hub_retry_delay_seconds": [0.0, 0.5]}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(tree))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    with running_hub() as hub:
        env = subprocess_env(
            HF_HUB_OFFLINE="0",
            HF_ENDPOINT=hub.url,
            HF_TOKEN=TOKEN,
            HF_HOME=str(tmp_path / "hf-home"),
            MLFLOW_TRACKING_URI=store,
            PREFECT_HOME=str(tmp_path / "prefect"),
        )
        hub.fail_commits = 99
        failed = ppoflow_run(config_file, env)
        assert failed.returncode == 2, failed.stderr[-3000:]
        (line,) = error_lines(failed.stderr)
        assert line.startswith("error: tracking.push_to_hub:") and "failed 3 times" in line and "is kept" in line
        versions = mlflow.MlflowClient(tracking_uri=store).search_model_versions("name='ppoflow-flow-test-policy'")
        assert [str(v.version) for v in versions] == ["1"]

        hub.fail_commits = 0
        pushed = ppoflow_run(config_file, env)
        assert pushed.returncode == 0, pushed.stderr[-3000:]

    summary = summary_of(pushed.stdout)
    (commit,) = hub.commits
    assert summary["hub_commit_url"] == f"{hub.url}/my-org/toy-policy/commit/" + commit_oid(summary)
    assert summary["registered_model"]["version"] == "1"  # the version the failed push kept
    final = Path(summary["output_dir"]) / "final"
    assert set(commit.files) == {p.name for p in final.iterdir()} | {"README.md"}
    assert commit.files["model.safetensors"] == (final / "model.safetensors").read_bytes()
    card = commit.files["README.md"].decode()
    assert summary["mlflow_run_id"] in card and "ppoflow-flow-test-policy` version 1" in card
    client = mlflow.MlflowClient(tracking_uri=store)
    tags = client.get_run(summary["mlflow_run_id"]).data.tags
    assert (
        tags["ppoflow.hub.commit"] == summary["hub_commit_url"] and tags["ppoflow.hub.repo_id"] == "my-org/toy-policy"
    )
    assert commit.authorization == f"Bearer {TOKEN}"
    # the token reaches the Hub and nothing else: not the output, the workspace, MLflow or Prefect's files
    assert TOKEN not in failed.stdout + failed.stderr + pushed.stdout + pushed.stderr + card
    for path in tmp_path.rglob("*"):
        if path.is_file() and "hf-home" not in path.parts:
            assert TOKEN.encode() not in path.read_bytes(), path


def commit_oid(summary: dict) -> str:
    return summary["hub_commit_url"].rsplit("/", 1)[-1]
