"""What the server modules decide without starting a server: the deployments' run config files, the
Prefect server's environment, the MLflow server's redaction of stored URIs, and the port checks."""

from __future__ import annotations

import socket

from ppoflow import processes
from ppoflow.config import load_config
from ppoflow.deployments import serve
from ppoflow.deployments.steps import load_run_config
from ppoflow.mlflow_server import redact_uri
from tests.deployment_files import config_file, declared


def test_each_deployment_takes_its_config_from_a_valid_run_config_file():
    """The files exist and validate; the nightly chains from the champion on the newest partition in a
    workspace per night, the template uses LoRA."""
    deployments = declared()
    assert config_file(deployments["toy-nightly"]) == serve.REPO_ROOT / "configs" / "toy-nightly.yaml"
    template = load_config(config_file(deployments["my-model"]))
    assert template.peft.enabled and template.models.ref is None
    nightly = load_run_config(str(config_file(deployments["toy-nightly"])))["config"]
    assert (
        nightly["tracking"]["experiment"] == "ppoflow-toy-nightly"
        and nightly["output_dir"] == "runs/toy-nightly/{date}"
    )
    assert nightly["models"]["policy"] == f"models:/{nightly['tracking']['registered_model_name']}@champion"
    assert nightly["tracking"]["promotion"]["alias"] == "champion" and nightly["data"]["window"] == {
        "newest": 1,
        "days": None,
    }
    assert all(entry["entrypoint"] == "flows/rlhf_ppo.py:rlhf_ppo" for entry in deployments.values())


def test_the_prefect_ui_calls_the_api_of_its_own_port(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    env = serve.prefect_server_env(tmp_path, 4321)
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    assert "PREFECT_API_URL" not in env and env["PREFECT_HOME"] == str(tmp_path / "prefect")


def test_flow_runs_of_the_worker_know_the_prefect_ui_only_when_it_is_served(tmp_path):
    """PREFECT_UI_URL is what a flow run writes as its page into the MLflow run's flow-run tag."""
    stack = serve.Stack(
        home=str(tmp_path),
        prefect_url="http://127.0.0.1:4321",
        mlflow_url="http://127.0.0.1:5432",
        work_pool=serve.WORK_POOL,
        deployments=[],
    )
    env = serve.worker_environment(stack)
    assert (env["PREFECT_API_URL"], env["PREFECT_UI_URL"]) == ("http://127.0.0.1:4321/api", "http://127.0.0.1:4321")
    stack.ui = False
    assert serve.worker_environment(stack)["PREFECT_UI_URL"] == ""


def test_the_backend_uri_the_mlflow_server_stores_has_no_password():
    assert redact_uri("postgresql://u:s3cret@db:5432/mlflow") == "postgresql://u:***@db:5432/mlflow"
    assert redact_uri("postgresql://u@db/mlflow") == "postgresql://u@db/mlflow"
    assert redact_uri("sqlite:////a/b.db") == "sqlite:////a/b.db"


def test_a_port_is_in_use_while_a_socket_listens_on_it(closed_port):
    assert not processes.port_in_use("127.0.0.1", closed_port)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", closed_port))
        listener.listen()
        assert processes.port_in_use("127.0.0.1", closed_port)
        assert serve.choose_port(None, closed_port, "test server") != closed_port  # taken: any free one instead
    assert processes.http_status(f"http://127.0.0.1:{closed_port}/health", timeout=1.0) is None
