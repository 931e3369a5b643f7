"""The `runtime` section: applied to torch in the process that runs the models, outside config_hash."""

from __future__ import annotations

import os

import pytest
import torch

from ppoflow.config import RuntimeConfig, build_config
from ppoflow.runtime import configure_torch


@pytest.fixture
def torch_state(monkeypatch):
    """Restore what configure_torch changes (process-wide settings)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    threads, deterministic, warn_only, cudnn_deterministic, cudnn_benchmark = saved
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark


def test_deterministic_by_default(torch_state):
    torch.use_deterministic_algorithms(False)
    configure_torch(RuntimeConfig())
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_a_users_cublas_setting_is_kept(torch_state, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    configure_torch(RuntimeConfig())
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_off_lets_torch_choose(torch_state):
    configure_torch(RuntimeConfig(deterministic=False))
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_num_threads(torch_state):
    configure_torch(RuntimeConfig(num_threads=1))
    assert torch.get_num_threads() == 1
    before = torch.get_num_threads()
    configure_torch(RuntimeConfig())  # null keeps what the process has
    assert torch.get_num_threads() == before


MINIMAL = {"models": {"policy": "p", "reward": "r"}, "data": {"path": "d"}}


def test_runtime_is_outside_the_config_hash():
    plain = build_config(MINIMAL)
    assert plain.config_hash() == build_config(MINIMAL, ["runtime.deterministic=false", "runtime.num_threads=2"]).config_hash()
    assert plain.config_hash() != build_config(MINIMAL, ["models.frozen_dtype=bfloat16"]).config_hash()


@pytest.mark.parametrize(("override", "field"), [("runtime.num_threads=0", "runtime.num_threads"),
                                                 ("runtime.cores=2", "runtime.cores"),
                                                 ("models.frozen_dtype=int8", "models.frozen_dtype")])
def test_bad_runtime_values_are_refused_in_one_line(override, field):
    from ppoflow.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        build_config(MINIMAL, [override])
    assert field in str(caught.value) and "\n" not in str(caught.value)


def test_an_accelerate_config_for_one_machine_is_read(tmp_path):
    from ppoflow.runtime import read_accelerate_config

    path = tmp_path / "accelerate.yaml"
    path.write_text("distributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 4\ngpu_ids: all\n")
    assert read_accelerate_config(RuntimeConfig(num_processes=4, accelerate_config=path))["num_processes"] == 4
    assert read_accelerate_config(RuntimeConfig()) == {}


@pytest.mark.parametrize(("text", "says"), [
    ("[1, 2]\n", "is not a YAML mapping"),
    ("distributed_type: DEEPSPEED\n", "DeepSpeed is not built"),
    ("distributed_type: TPU\n", "asks for distributed_type TPU"),
    ("num_processes: 8\n", "says num_processes 8 and runtime.num_processes is 4"),
    ("distributed_type: [unclosed\n", "cannot be read"),
])
def test_an_accelerate_config_ppoflow_cannot_honour_is_refused_in_one_line(tmp_path, text, says):
    from ppoflow.errors import ConfigError
    from ppoflow.runtime import read_accelerate_config

    path = tmp_path / "accelerate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_accelerate_config(RuntimeConfig(num_processes=4, accelerate_config=path))
    message = str(refused.value)
    assert message.startswith("config field `runtime.accelerate_config`") and says in message and "\n" not in message
