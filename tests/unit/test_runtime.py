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
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
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
    assert (
        plain.config_hash()
        == build_config(MINIMAL, ["runtime.deterministic=false", "runtime.num_threads=2"]).config_hash()
    )
    assert plain.config_hash() != build_config(MINIMAL, ["models.frozen_dtype=bfloat16"]).config_hash()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("runtime.num_threads=0", "runtime.num_threads"),
        ("runtime.cores=2", "runtime.cores"),
        ("models.frozen_dtype=int8", "models.frozen_dtype"),
    ],
)
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


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[1, 2]\n", "is not a YAML mapping"),
        ("distributed_type: DEEPSPEED\n", "asks for DeepSpeed and gives no deepspeed_config.zero_stage"),
        (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  offload_param_device: cpu\n",
            "offload is not built",
        ),
        (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n",
            "ppoflow builds the DeepSpeed config",
        ),
        (
            "mixed_precision: bf16\n",
            "asks for mixed_precision bf16, and ppoflow's precision is the config's — set mixed_precision: 'no'",
        ),
        (
            "num_machines: 2\nmachine_rank: 1\nmain_process_ip: 10.0.0.1\n",
            "is for machine_rank 1, and the flow runs on the main machine",
        ),
        ("num_machines: 2\n", "is for 2 machines and gives no main_process_ip"),
        (
            "num_machines: 3\nmain_process_ip: 10.0.0.1\n",
            "is for 3 machines and runtime.num_processes is 4 (processes in all)",
        ),
        (
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_offload_params: true\n",
            "fsdp_config.fsdp_offload_params: True, and with ppoflow parameters",
        ),
        (
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n",
            "set it to FULL_SHARD or 1",
        ),
        (
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_activation_checkpointing: true\n",
            "set ppo.gradient_checkpointing: true instead",
        ),
        (
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_min_num_params: 1000\n",
            "sets fsdp_config.fsdp_min_num_params, which ppoflow does not do",
        ),
        (
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_cpu_ram_efficient_loading: true\n",
            "every process loads the weights itself",
        ),
        ("distributed_type: TPU\n", "asks for distributed_type TPU"),
        ("num_processes: 8\n", "says num_processes 8 and runtime.num_processes is 4"),
        ("distributed_type: [unclosed\n", "cannot be read"),
    ],
)
def test_an_accelerate_config_ppoflow_cannot_honour_is_refused_in_one_line(tmp_path, text, says):
    from ppoflow.errors import ConfigError
    from ppoflow.runtime import read_accelerate_config

    path = tmp_path / "accelerate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_accelerate_config(RuntimeConfig(num_processes=4, accelerate_config=path))
    message = str(refused.value)
    assert message.startswith("config field `runtime.accelerate_config`") and says in message and "\n" not in message


# What `accelerate config` writes for FSDP2 on one machine, with ppoflow's defaults.
ACCELERATE_FSDP = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_activation_checkpointing: false
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_version: 2
machine_rank: 0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
"""


def test_an_accelerate_config_asking_for_fsdp_shards_with_ppoflows_own_and_launches_plain_processes(tmp_path):
    import yaml

    from ppoflow.runtime import check_sharding_plan, launchable_accelerate_config, sharding

    path = tmp_path / "accelerate.yaml"
    path.write_text(ACCELERATE_FSDP)
    runtime = RuntimeConfig(num_processes=2, accelerate_config=path)
    assert sharding(runtime) == check_sharding_plan(runtime, lora=False)
    assert sharding(runtime).fsdp and sharding(runtime).layer_classes == ("LlamaDecoderLayer",)
    launched = yaml.safe_load(launchable_accelerate_config(path, tmp_path / "launch" / "accelerate.yaml").read_text())
    assert (
        launched["distributed_type"] == "MULTI_GPU" and "fsdp_config" not in launched and launched["num_processes"] == 2
    )
    plain = tmp_path / "plain.yaml"
    plain.write_text("distributed_type: MULTI_GPU\n")
    assert launchable_accelerate_config(plain, tmp_path / "unused.yaml") == plain  # passed as it is
    assert not sharding(RuntimeConfig(num_processes=2, accelerate_config=plain)).fsdp


@pytest.mark.parametrize(
    ("runtime", "lora", "field", "says"),
    [
        (
            {"num_processes": 1},
            False,
            "runtime.accelerate_config",
            "runtime.num_processes is 1: there is nothing to shard over",
        ),
        ({"num_processes": 2}, True, "runtime.accelerate_config", "LoRA with FSDP is not built"),
        (
            {"num_processes": 2, "fsdp_frozen": True, "accelerate_config": None},
            False,
            "runtime.fsdp_frozen",
            "the policy is not sharded",
        ),
    ],
)
def test_sharding_that_cannot_run_is_refused_in_stage_1(tmp_path, runtime, lora, field, says):
    from ppoflow.errors import ConfigError
    from ppoflow.runtime import check_sharding_plan

    path = tmp_path / "accelerate.yaml"
    path.write_text(ACCELERATE_FSDP.replace("num_processes: 2\n", ""))
    with pytest.raises(ConfigError) as refused:
        check_sharding_plan(RuntimeConfig(**({"accelerate_config": path} | runtime)), lora=lora)
    assert str(refused.value).startswith(f"config field `{field}`") and says in str(refused.value)


def test_an_accelerate_config_for_several_machines_is_read(tmp_path):
    from ppoflow.machines import Machines
    from ppoflow.runtime import machine_count, read_accelerate_config

    path = tmp_path / "accelerate.yaml"
    path.write_text(
        "distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 0\n"
        "main_process_ip: 10.0.0.1\nmain_process_port: 29555\nnum_processes: 4\nsame_network: true\n"
    )
    settings = read_accelerate_config(RuntimeConfig(num_processes=4, accelerate_config=path))
    assert machine_count(settings) == 2
    assert Machines.from_settings(settings) == Machines(num_machines=2, main_process_ip="10.0.0.1", same_network=True)


def test_an_accelerate_config_asking_for_deepspeed_trains_with_ppoflows_engine_and_checks_the_run_configs_own_settings(
    tmp_path,
):
    import yaml

    from ppoflow.config import PPOConfig
    from ppoflow.errors import ConfigError
    from ppoflow.runtime import check_sharding_plan, launchable_accelerate_config

    path = tmp_path / "accelerate.yaml"
    path.write_text(
        "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  gradient_accumulation_steps: 4\n"
        "  gradient_clipping: auto\n  offload_optimizer_device: none\nnum_processes: 2\n"
    )
    runtime = RuntimeConfig(num_processes=2, accelerate_config=path)
    assert check_sharding_plan(runtime, lora=False, ppo=PPOConfig(gradient_accumulation_steps=4)).zero_stage == 2
    with pytest.raises(
        ConfigError, match=r"deepspeed_config.gradient_accumulation_steps: 4 and ppo.gradient_accumulation_steps is 1"
    ):
        check_sharding_plan(runtime, lora=False, ppo=PPOConfig(gradient_accumulation_steps=1))
    with pytest.raises(ConfigError, match="LoRA with DeepSpeed is not built"):
        check_sharding_plan(runtime, lora=True)
    with pytest.raises(ConfigError, match="one sharding at a time"):
        check_sharding_plan(RuntimeConfig(num_processes=2, fsdp=True, accelerate_config=path), lora=False)
    launched = yaml.safe_load(launchable_accelerate_config(path, tmp_path / "launch.yaml").read_text())
    assert launched["distributed_type"] == "MULTI_GPU" and "deepspeed_config" not in launched


@pytest.mark.parametrize(
    ("variable", "mode"), [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
)
def test_processes_accelerate_launched_in_its_own_sharding_mode_are_refused(monkeypatch, variable, mode):
    from ppoflow.errors import ConfigError
    from ppoflow.runtime import check_launched_plain

    check_launched_plain()
    monkeypatch.setenv(variable, "true")
    with pytest.raises(
        ConfigError, match=f"accelerate's {mode} mode, which ppoflow does not use — launch plain processes"
    ):
        check_launched_plain()
