"""ppoflow.flows.alerts without servers: the links a message carries (tests/integration/test_deployments.py
sends real ones through a Prefect server's automations)."""

from __future__ import annotations

from ppoflow.flows.alerts import mlflow_page


def test_an_mlflow_link_names_the_server_and_the_run_never_a_login():
    assert (
        mlflow_page("http://admin:s3cret@127.0.0.1:5000/", "7", "abc")
        == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    )
    assert mlflow_page("https://mlflow.example.com/tracking", "1", "r") == (
        "https://mlflow.example.com/tracking/#/experiments/1/runs/r?workflowType=machine_learning"
    )


def test_a_local_store_has_no_page_to_link():
    assert mlflow_page("sqlite:////runs/mlflow.db", "1", "r") is None
    assert mlflow_page("file:///runs/mlruns", "1", "r") is None
