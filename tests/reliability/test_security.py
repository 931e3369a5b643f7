"""Security defaults, checked on the source and the entry points (fast; no training).

Checkpoints are never unpickled beyond tensors, weights come only from safetensors (LoRA adapters:
safetensors or bare tensors), remote code runs only when the config asks, servers bind loopback and
have no default password. That stage results are JSON (never pickles) is checked on a real flow run
in tests/flow/test_flow.py, and that no secret reaches params, tags, artifacts, logs or Prefect
results end to end in test_flow_faults.py::test_no_secret_is_written_anywhere.
"""

from __future__ import annotations

import ast
import inspect
import pickle
from pathlib import Path

import pytest

from tests.reliability.helpers import REPO

PACKAGES = ("ppoflow", "flows", "tasks", "mlflow_server", "deployments")
# `X.from_pretrained` that reads no weights (JSON files), and LoRA adapters, whose loader has no
# use_safetensors switch (see test_lora_adapters_are_never_unpickled); every other one must say
# use_safetensors=True.
NO_WEIGHTS = {"AutoConfig", "AutoTokenizer", "PreTrainedTokenizerFast", "GenerationConfig"}
ADAPTER_LOADERS = {"PeftModel"}


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


def _receiver(func: ast.Attribute) -> str | None:
    """`AutoModel` of `AutoModel.from_pretrained` and of `transformers.AutoModel.from_pretrained`."""
    if isinstance(func.value, ast.Name):
        return func.value.id
    return func.value.attr if isinstance(func.value, ast.Attribute) else None


def test_models_load_from_safetensors_only():
    loose = []
    for path in _sources():
        for call in _calls(path):
            func = call.func
            if not (isinstance(func, ast.Attribute) and func.attr == "from_pretrained"):
                continue
            receiver = _receiver(func)
            if receiver not in NO_WEIGHTS | ADAPTER_LOADERS and _keyword(call, "use_safetensors") is not True:
                loose.append(f"{_where(path, call)} ({receiver or ast.unparse(func.value)})")
    assert not loose, f"from_pretrained without use_safetensors=True: {loose}"


class _RunsWhenUnpickled:
    """Pickles to `open(marker, "w")`: loading it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_lora_adapters_are_never_unpickled(tmp_path):
    """PeftModel.from_pretrained (how ppoflow loads LoRA checkpoints) reads adapter_model.safetensors,
    else adapter_model.bin through torch.load(weights_only=True): an adapter that is a pickle is refused
    without running it."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    adapter, marker = tmp_path / "adapter", tmp_path / "unpickled"
    LoraConfig(target_modules=["q_proj"], r=2).save_pretrained(adapter)
    torch.save({"lora_A.weight": _RunsWhenUnpickled(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        PeftModel.from_pretrained(base, adapter)
    assert not marker.exists()
    torch.load(adapter / "adapter_model.bin", weights_only=False)["lora_A.weight"].close()  # a plain load runs it
    assert marker.exists()


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


def test_servers_bind_loopback_and_have_no_default_password(tmp_path, monkeypatch):
    from ppoflow.mlflow_server.server import ServerError, start_server

    assert inspect.signature(start_server).parameters["host"].default == "127.0.0.1"
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    with pytest.raises(ServerError, match="no defaults"):
        start_server(tmp_path / "auth-without-password", auth=True)
    assert not (tmp_path / "auth-without-password" / "mlflow-server.pid").exists()
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "a-long-admin-password-1")
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "k" * 32)
    with pytest.raises(ServerError, match="--auth-cache-seconds is -1"):
        start_server(tmp_path / "negative-cache", auth=True, auth_cache_seconds=-1)
    assert not (tmp_path / "negative-cache" / "mlflow-server.pid").exists()


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
