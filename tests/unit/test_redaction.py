"""ppoflow.redaction: the one redactor, for tracking params and tags, the MLflow server's files, logs."""

from __future__ import annotations

from ppoflow.redaction import is_secret_key, redact, redact_uri


def test_redact_hides_secret_keys_and_uri_passwords():
    assert redact("postgresql://mlflow:hunter2@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert redact("https://user:p@ss@host/x") == "https://user:***@host/x"
    assert redact("http://127.0.0.1:5000/path") == "http://127.0.0.1:5000/path"
    tree = {
        "hub_token": "hf_abc",
        "HF_TOKEN": "hf_def",
        "password": "pw",
        "client_secret": "s",
        "api_key": "k",
        "stop_token": "eos",
        "pad_token_id": 0,
        "tokenizer": "dir",
        "nested": [{"access_token": "t", "url": "s3://a:b@c/d"}],
    }
    assert redact(tree) == {
        "hub_token": "***",
        "HF_TOKEN": "***",
        "password": "***",
        "client_secret": "***",
        "api_key": "***",
        "stop_token": "eos",
        "pad_token_id": 0,
        "tokenizer": "dir",
        "nested": [{"access_token": "***", "url": "s3://a:***@c/d"}],
    }


def test_uri_passwords_are_hidden_whatever_the_user_and_host():
    assert (
        redact_uri("postgresql://u:pw@/mlflow?host=/var/run/postgresql")
        == "postgresql://u:***@/mlflow?host=/var/run/postgresql"
    )
    assert redact_uri("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_uri("postgresql+psycopg://u:pw@[::1]:5432/mlflow") == "postgresql+psycopg://u:***@[::1]:5432/mlflow"
    assert redact_uri("started with postgresql://u:pw@db/mlflow, listening on http://127.0.0.1:5000") == (
        "started with postgresql://u:***@db/mlflow, listening on http://127.0.0.1:5000"
    )
    assert redact_uri("postgresql://u@db/mlflow") == "postgresql://u@db/mlflow"
    assert redact_uri("http://127.0.0.1:5000/runs/a@b") == "http://127.0.0.1:5000/runs/a@b"


def test_secret_keys_are_named_by_their_last_part():
    assert all(
        is_secret_key(key) for key in ("hub_token", "HF_TOKEN", "db.password", "aws-secret-access-key", "apikey")
    )
    assert not any(is_secret_key(key) for key in ("stop_token", "eos_token", "tokenizer", "max_tokens", "author"))
    assert redact({"hub_token": None, "password": ""}) == {"hub_token": None, "password": ""}
