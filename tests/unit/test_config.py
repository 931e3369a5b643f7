"""The run config: validation with the field named, overrides, batch arithmetic, config hash."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ppoflow.batching import BatchPlan
from ppoflow.config import PPOConfig, build_config, expand_output_dir, load_config, names_registry_alias, parse_override
from ppoflow.errors import ConfigError
from ppoflow.pipeline import configure


@pytest.fixture
def tree(tmp_path):
    for name in ("policy", "reward"):
        (tmp_path / name).mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n')
    return {
        "output_dir": str(tmp_path / "out"),
        "models": {"policy": str(tmp_path / "policy"), "reward": str(tmp_path / "reward")},
        "data": {"path": str(tmp_path / "prompts.jsonl")},
    }


def test_batch_plan_matches_trl_arithmetic():
    # TRL 1.12: per process 4 × 6 accumulation = 24 prompts per rollout, in 3 mini-batches of 8,
    # each in micro-batches of 4 (2 per mini-batch); 2 processes → 48 per batch;
    # ceil(100 / 48) = 3 updates; 3 × 2 epochs × 3 mini-batches = 18 optimizer steps.
    ppo = PPOConfig(
        total_episodes=100,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=6,
        num_mini_batches=3,
        num_ppo_epochs=2,
        local_rollout_forward_batch_size=10,
    )
    plan = BatchPlan.derive(ppo, world_size=2)
    assert plan.local_batch_size == 24
    assert plan.batch_size == 48
    assert plan.local_mini_batch_size == 8
    assert plan.mini_batch_size == 16
    assert plan.local_micro_batch_size == 4
    assert plan.micro_batch_size == 8
    assert plan.micro_batches_per_mini_batch == 2
    assert plan.num_updates == 3
    assert plan.optimizer_steps == 18


def test_mini_batch_smaller_than_micro_batch_is_one_micro_batch():
    # TRL's toy setting: 64 prompts per process in 4 mini-batches of 16; the micro-batch shrinks to 16.
    plan = BatchPlan.derive(PPOConfig(total_episodes=64, per_device_train_batch_size=64, num_mini_batches=4))
    assert (
        plan.local_batch_size,
        plan.local_mini_batch_size,
        plan.local_micro_batch_size,
        plan.micro_batches_per_mini_batch,
    ) == (64, 16, 16, 1)


@pytest.mark.parametrize(
    ("fields", "field", "text"),
    [
        ({"per_device_train_batch_size": 6, "num_mini_batches": 4}, "ppo.num_mini_batches", "does not divide"),
        (
            {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "num_mini_batches": 2},
            "ppo.per_device_train_batch_size",
            "does not divide",
        ),
    ],
)
def test_batch_shapes_that_do_not_divide_are_refused(fields, field, text):
    with pytest.raises(ConfigError, match=f"`{field}`.*{text}"):
        BatchPlan.derive(PPOConfig(total_episodes=1000, **fields))


def test_overrides_are_yaml_values(tree):
    config = build_config(
        tree, ["ppo.learning_rate=1e-5", "peft.enabled=true", "peft.target_modules=[q_proj]", "ppo.stop_token=eos"]
    )
    assert config.ppo.learning_rate == 1e-5
    assert config.peft.enabled is True
    assert config.peft.target_modules == ["q_proj"]
    assert parse_override("data.prompt_column=text") == ("data.prompt_column", "text")


def test_config_hash_ignores_tracking_and_retries_but_not_training(tree):
    base = build_config(tree)
    assert build_config(tree, ["tracking.experiment=other", "flow.retries=5"]).config_hash() == base.config_hash()
    assert build_config(tree, ["ppo.learning_rate=1e-5"]).config_hash() != base.config_hash()


BAD = [
    (["ppo.learnign_rate=1e-5"], "ppo.learnign_rate", "not a known setting"),
    (["ppo.learning_rate=abc"], "ppo.learning_rate", "valid number"),
    (["ppo.learning_rate=0"], "ppo.learning_rate", "greater than 0"),
    (["ppo.temperature=-1"], "ppo.temperature", "greater than 0"),
    (["ppo.response_length=0"], "ppo.response_length", "greater than 0"),
    (["data.max_prompt_length=0"], "data.max_prompt_length", "greater than 0"),
    (["ppo.per_device_train_batch_size=0"], "ppo.per_device_train_batch_size", "greater than 0"),
    (["ppo.top_p=1.5"], "ppo.top_p", "less than or equal to 1"),
    (["ppo.gamma=2"], "ppo.gamma", "less than or equal to 1"),
    (["ppo.kl_estimator=k2"], "ppo.kl_estimator", "'k1' or 'k3'"),
    (["ppo.stop_token=newline"], "ppo.stop_token", "'eos'"),
    (["models.dtype=float8"], "models.dtype", "auto"),
    (["data.eval_size=-1"], "data.eval_size", "greater than or equal to 0"),
    (["reward_functions=[{path: 'not a path'}]"], "reward_functions.0.path", "package.module:function"),
    (["tracking.push_to_hub=true"], "tracking", "hub_repo_id"),
    (["models=null"], "models", "valid dictionary"),
    (["ppo=3"], "ppo", "valid dictionary"),
    (["ppo.seed=1.5"], "ppo.seed", "valid integer"),
    (["ppo.eval_every=0"], "ppo.eval_every", "greater than 0"),
    (["ppo.eval_every=-4"], "ppo.eval_every", "greater than 0"),
    (["ppo.eval_every=often"], "ppo.eval_every", "valid integer"),
    (["ppo.eval_every=2.5"], "ppo.eval_every", "valid integer"),
    (["ppo.eval_every=true"], "ppo.eval_every", "valid integer"),
    (["ppo.eval_every=4", "data.eval_size=0"], "ppo.eval_every", "no held-out prompts"),
    (["data.eval_size=0"], "data.eval_size", "the promotion gate (tracking.promotion) judges"),
    (["runtime.fsdp=true"], "runtime.fsdp", "runtime.num_processes is 1"),
    (
        ["runtime.fsdp=true", "runtime.num_processes=2", "peft.enabled=true"],
        "runtime.fsdp",
        "LoRA with FSDP is not built",
    ),
    (["runtime.keep_archives=-1"], "runtime.keep_archives", "greater than or equal to 0"),
    (["ppo.learning_rate"], "ppo.learning_rate", "key.path=value"),
    (["output_dir=runs/{foo}"], "output_dir", "unknown placeholder {foo}"),
    (["output_dir=runs/{Date}/x"], "output_dir", "unknown placeholder {Date}"),
    (["output_dir=runs/{date"], "output_dir", "unbalanced brace"),
    (["output_dir=runs/date}"], "output_dir", "unbalanced brace"),
    (["output_dir=runs/{{date}}"], "output_dir", "unbalanced brace"),
]


@pytest.mark.parametrize(("overrides", "field", "text"), BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_values_name_the_field(tree, overrides, field, text):
    with pytest.raises(ConfigError) as caught:
        build_config(tree, overrides)
    message = str(caught.value)
    assert f"`{field}" in message and text in message
    assert "\n" not in message


def test_eval_every_is_off_by_default_and_a_number_of_updates(tree):
    assert build_config(tree).ppo.eval_every is None
    assert build_config(tree, ["ppo.eval_every=3"]).ppo.eval_every == 3
    assert (
        build_config(tree, ["ppo.eval_every=null", "data.eval_size=0", "tracking.promotion=null"]).ppo.eval_every
        is None
    )


def test_missing_section_is_named(tree):
    del tree["models"]
    with pytest.raises(ConfigError, match="`models`: is required"):
        build_config(tree)


@pytest.mark.parametrize(
    ("edit", "text"),
    [
        (
            lambda t: t.__setitem__("modles", t.pop("models")),
            "`modles`: is not a known setting — did you mean `models`?",
        ),
        (
            lambda t: t.__setitem__("ppo", {"learning_rat": 1e-5}),
            "`ppo.learning_rat`: is not a known setting — did you mean `learning_rate`?",
        ),
        (
            lambda t: t["data"].__setitem__("window", {"newst": 1}),
            "`data.window.newst`: is not a known setting — did you mean `newest`?",
        ),
        (
            lambda t: t.__setitem__("reward_functions", [{"path": "m:f", "wieght": 1}]),
            "`reward_functions.0.wieght`: is not a known setting — did you mean `weight`?",
        ),
        (
            lambda t: t.__setitem__("zzz", 1),
            "`zzz`: is not a known setting — known here: output_dir, models, data, ppo",
        ),
        (
            lambda t: t.__setitem__("peft", {"enabled": True, "lora_dropout": 0.05}),
            "`peft.lora_dropout`: is not a setting here — remove it: "
            "ppoflow trains with every dropout off, LoRA's included",
        ),
    ],
)
def test_an_unknown_key_is_reported_before_what_it_hides_with_the_closest_name(tree, edit, text):
    edit(tree)
    with pytest.raises(ConfigError) as refused:
        build_config(tree)
    assert text in str(refused.value)


@pytest.mark.parametrize(
    ("content", "where"),
    [
        ("models:\n\tpolicy: x\n", "at line 2, column 1: found character '\\t' that cannot start any token"),
        ("ppo: {a: 1\nb: 2\n", "at line 2, column 2: expected ',' or '}', but got ':'"),
    ],
)
def test_yaml_syntax_errors_give_line_and_column(tmp_path, content, where):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert f"{path} is not valid YAML {where}" in str(refused.value)


def test_a_config_file_that_is_not_text_is_refused_in_one_line(tmp_path):
    path = tmp_path / "config.yaml.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)


STAGE_ONE_BAD = [
    (
        ["ppo.total_episodes=10", "ppo.per_device_train_batch_size=8", "ppo.gradient_accumulation_steps=2"],
        "ppo.total_episodes",
        "smaller than one rollout batch",
    ),
    (["models.policy=/does/not/exist"], "models.policy", "neither an existing directory nor a Hub id"),
    (["models.reward=./missing/reward/dir"], "models.reward", "neither an existing directory nor a Hub id"),
    (["data.path=/no/such/prompts.jsonl"], "data.path", "does not exist"),
    (["data.chat_template=/no/such/template.jinja"], "data.chat_template", "is not a file"),
    (["reward_functions=[{path: 'no_such_module:score'}]"], "reward_functions.0.path", "cannot import module"),
    (["reward_functions=[{path: 'ppoflow.toy:no_such_function'}]"], "reward_functions.0.path", "no callable"),
    (
        ["reward_functions=[{path: 'ppoflow.toy:oracle_score'}, {path: 'ppoflow.toy:oracle_score'}]"],
        "reward_functions",
        "used twice",
    ),
    (["peft.enabled=true", "models.ref=/tmp"], "models.ref", "with LoRA"),
    (["ppo.stop_token=eos", "ppo.stop_token_id=5"], "ppo.stop_token_id", "only one"),
    (["output_dir=/proc/ppoflow-run"], "output_dir", "not writable"),
]


@pytest.mark.parametrize(
    ("overrides", "field", "text"), STAGE_ONE_BAD, ids=[b[1] + ":" + b[2][:12] for b in STAGE_ONE_BAD]
)
def test_stage_one_refuses_before_any_work(tree, overrides, field, text):
    config = build_config(tree, overrides)
    with pytest.raises(ConfigError) as caught:
        configure(config)
    assert f"`{field}`" in str(caught.value) and text in str(caught.value)


def test_output_dir_placeholders_expand_from_the_utc_day_and_the_flow_run(tree):
    config = build_config(tree, ["output_dir=runs/nightly-{date}/{flow_run}"])
    evening_in_new_york = datetime(2026, 12, 1, 20, 30, tzinfo=timezone(timedelta(hours=-5)))  # 01:30 UTC next day

    expanded = expand_output_dir(config, scheduled_start=evening_in_new_york, flow_run="0f1e2d3c")

    assert expanded.output_dir == Path("runs/nightly-2026-12-02/0f1e2d3c")
    # naive: UTC
    assert expand_output_dir(config, scheduled_start=datetime(2026, 12, 2, 1, 30), flow_run="0f1e2d3c") == expanded
    other = expand_output_dir(config, scheduled_start=evening_in_new_york, flow_run="9a8b7c6d")
    assert other.output_dir != expanded.output_dir
    assert other.config_hash() == expanded.config_hash()  # where a training is written is not what it is
    assert config.output_dir == Path("runs/nightly-{date}/{flow_run}")  # the config itself is unchanged
    plain = build_config(tree)
    assert expand_output_dir(plain, scheduled_start=evening_in_new_york, flow_run=None) is plain


def test_flow_run_placeholder_without_a_flow_run_is_refused_in_one_line(tree):
    config = build_config(tree, ["output_dir=runs/{flow_run}"])
    with pytest.raises(ConfigError) as caught:
        expand_output_dir(config, scheduled_start=datetime.now(timezone.utc), flow_run=None)
    message = str(caught.value)
    assert message.startswith("config field `output_dir`:") and "`ppoflow run`" in message and "\n" not in message
    with pytest.raises(ConfigError, match="`output_dir`: .* still holds placeholders"):
        configure(build_config(tree, ["output_dir=runs/{date}"]))


@pytest.mark.parametrize(
    ("overrides", "moves"),
    [
        ([], False),
        (["models.policy=models:/team-policy/3"], False),  # a version never moves
        (["models.policy=models:/team-policy@champion"], True),
        (["models.reward=models:/team-reward@production"], True),
        (["models.policy=models:/team-policy/3", "models.policy_fallback=models:/team-policy@sft"], True),
    ],
)
def test_a_registry_alias_is_what_stage_two_resolves_again_in_each_flow_run(tree, overrides, moves):
    assert names_registry_alias(build_config(tree, overrides).models) is moves
