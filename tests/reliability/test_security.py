"""Security defaults, checked on the source and the entry points (fast; no training).

Checkpoints are never unpickled beyond tensors, weights come only from safetensors, remote code
runs only when the config asks, stage results are JSON (never pickles), servers bind loopback and
have no default password. That no secret reaches params, tags, artifacts, logs or Prefect results
is checked end to end in test_flow_faults.py::test_no_secret_is_written_anywhere.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from tests.reliability.helpers import REPO

PACKAGES = ("ppoflow", "flows", "tasks", "mlflow_server")
MODEL_LOADERS = {"AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModel"}


def _sources() -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 20
    return files


def _calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.Call)]


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "<expression>"
    return None


def _where(path: Path, call: ast.Call) -> str:
    return f"{path.relative_to(REPO)}:{call.lineno}"


def test_torch_load_always_has_weights_only_and_nothing_unpickles():
    loose = []
    for path in _sources():
        for call in _calls(path):
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr == "load" and getattr(func.value, "id", None) == "torch":
                if _keyword(call, "weights_only") is not True:
                    loose.append(_where(path, call))
        text = path.read_text()
        for needle in ("import pickle", "from pickle", "pickle.load", "cloudpickle", "import dill", "joblib.load"):
            if needle in text:
                loose.append(f"{path.relative_to(REPO)}: {needle}")
    assert not loose, loose


def test_models_load_from_safetensors_only():
    loose = []
    for path in _sources():
        for call in _calls(path):
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr == "from_pretrained" and getattr(func.value, "id", None) in MODEL_LOADERS:
                if _keyword(call, "use_safetensors") is not True:
                    loose.append(_where(path, call))
    assert not loose, f"model loads without use_safetensors=True: {loose}"


def test_remote_code_runs_only_when_the_config_asks():
    from ppoflow.config import ModelsConfig

    assert ModelsConfig.model_fields["trust_remote_code"].default is False
    literal = [
        _where(path, call)
        for path in _sources()
        for call in _calls(path)
        if _keyword(call, "trust_remote_code") is True
    ]
    assert not literal, f"trust_remote_code=True hard-coded: {literal}"


def test_stage_results_are_stored_as_json_not_pickles():
    from tasks.common import STAGE_OPTIONS

    assert STAGE_OPTIONS["result_serializer"] == "json"


def test_servers_bind_loopback_and_have_no_default_password(tmp_path, monkeypatch):
    from mlflow_server.server import ServerError, start_server

    assert inspect.signature(start_server).parameters["host"].default == "127.0.0.1"
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    with pytest.raises(ServerError, match="no defaults"):
        start_server(tmp_path / "auth-without-password", auth=True)
    assert not (tmp_path / "auth-without-password" / "mlflow-server.pid").exists()


def test_secret_config_values_and_uri_passwords_are_redacted():
    from ppoflow.redaction import redact
    from ppoflow.tracking import flatten

    tree = {
        "tracking": {"hub_token": "hf_abcdef123456", "experiment": "x"},
        "store": "postgresql://mlflow:s3cret-pw@db.internal:5432/mlflow",
        "ppo": {"stop_token": "eos"},
    }
    flat = flatten(redact(tree))
    assert flat["tracking.hub_token"] == "***" and flat["ppo.stop_token"] == "eos"
    assert "s3cret-pw" not in flat["store"] and flat["store"].startswith("postgresql://mlflow:***@db.internal")
