"""The catalogue of bad input: config, models, data and tracking a user can get wrong.

Every case goes through the `ppoflow` command itself (`ppoflow train`, or `ppoflow run` for what
only the flow uses: tracking), in this process, and must be refused with exit code 2, nothing on
stdout, exactly one `error: ...` line on stderr that names the field and says what to do (` — `),
before anything is trained (no checkpoint directory) and with nothing in MLflow's model registry.
The `ppoflow run` cases (marked `flow`) share one Prefect test server for the module, except those
refused before Prefect starts (a config error, a tracking store that does not answer): no server.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest

from ppoflow.checkpoint import write_checkpoint
from tests.reliability.helpers import error_lines, reliability_config, write_config

pytestmark = pytest.mark.slow  # every case needs the toy world, and `bad` saves models made from it


@dataclass(frozen=True)
class Case:
    id: str
    expected: str  # the field as the message names it
    overrides: tuple[str, ...] = ()
    command: str = "train"
    tracking_uri: str | None = None  # MLFLOW_TRACKING_URI for this case (default: the module's store)
    config_file: str | None = None  # a broken config file instead of the good one
    prepare: Callable[[Path], None] | None = field(default=None, compare=False)  # given the output_dir
    before_prefect: bool = False  # `ppoflow run` refuses it before Prefect starts: no Prefect server for it


def _another_configs_checkpoint(output_dir: Path) -> None:
    state = {
        "update": 0,
        "episode": 0,
        "optimizer_steps": 0,
        "num_updates": 8,
        "config_hash": "0123456789abcdef",
        "world_size": 1,
    }
    write_checkpoint(
        output_dir / "checkpoints", 0, lambda directory: (directory / "weights.txt").write_text("other run"), state
    )


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def reply(content: str) -> dict:
    return {"role": "assistant", "content": content}


def rf(path: str) -> str:
    """A `reward_functions` override (braces doubled: overrides go through str.format)."""
    return "reward_functions=[{{path: '" + path + "', weight: 0.0}}]"


CASES = [
    # -- config ----------------------------------------------------------------------------------
    Case("unknown key", "`ppo.learning_rat`", ("ppo.learning_rat=1e-5",)),
    Case("wrong type", "`ppo.learning_rate`", ("ppo.learning_rate=fast",)),
    Case("out of range", "`ppo.cliprange`", ("ppo.cliprange=-0.2",)),
    Case("unknown choice", "`ppo.kl_estimator`", ("ppo.kl_estimator=k2",)),
    Case("malformed --set", "`ppo.learning_rate`", ("ppo.learning_rate",)),
    Case("episodes below one batch", "`ppo.total_episodes`", ("ppo.total_episodes=8",)),
    Case("mini-batches not dividing the batch", "`ppo.num_mini_batches`", ("ppo.num_mini_batches=3",)),
    Case("stop token given twice", "`ppo.stop_token_id`", ("ppo.stop_token=eos", "ppo.stop_token_id=2")),
    Case("stop token outside the vocabulary", "`ppo.stop_token_id`", ("ppo.stop_token_id=100000",)),
    Case("evaluation every 0 updates", "`ppo.eval_every`", ("ppo.eval_every=0",)),
    Case(
        "evaluation during training without eval prompts", "`ppo.eval_every`", ("ppo.eval_every=2", "data.eval_size=0")
    ),
    Case("a promotion gate without eval prompts", "`data.eval_size`", ("data.eval_size=0",)),
    Case("reference with LoRA", "`models.ref`", ("peft.enabled=true", "models.ref=/tmp")),
    Case("sharded training on one process", "`runtime.fsdp`", ("runtime.fsdp=true",)),
    Case(
        "sharded training with LoRA",
        "`runtime.fsdp`",
        ("runtime.fsdp=true", "runtime.num_processes=2", "peft.enabled=true"),
    ),
    Case(
        "sharded frozen models beside an unsharded policy",
        "`runtime.fsdp_frozen`",
        ("runtime.fsdp_frozen=true", "runtime.num_processes=2"),
    ),
    Case(
        "an accelerate config that shards over one process",
        "`runtime.accelerate_config`",
        ("runtime.accelerate_config={bad}/accelerate-fsdp.yaml",),
    ),
    Case(
        "an accelerate config for two machines and one process",
        "`runtime.accelerate_config`",
        ("runtime.accelerate_config={bad}/accelerate-two-nodes.yaml",),
    ),
    Case(
        "an accelerate config offloading DeepSpeed's optimizer",
        "`runtime.accelerate_config`",
        ("runtime.accelerate_config={bad}/accelerate-deepspeed.yaml", "runtime.num_processes=2"),
    ),
    Case(
        "an accelerate FSDP setting ppoflow does not do",
        "`runtime.accelerate_config`",
        ("runtime.accelerate_config={bad}/accelerate-offload.yaml", "runtime.num_processes=2"),
    ),
    Case(
        "an accelerate config that is not there",
        "`runtime.accelerate_config`",
        ("runtime.accelerate_config={bad}/no-such-accelerate.yaml",),
    ),
    Case(
        "an accelerate config that is a gzip file",
        "`runtime.accelerate_config`",
        ("runtime.accelerate_config={bad}/accelerate.yaml.gz",),
    ),
    Case(
        "flash-attention without a GPU",
        "`models.attn_implementation`",
        ("models.attn_implementation=flash_attention_2",),
    ),
    Case("push to hub without a repo", "`tracking`", ("tracking.push_to_hub=true",)),
    Case("negative lock timeout", "`flow.lock_timeout_seconds`", ("flow.lock_timeout_seconds=-1",)),
    Case("reward function: unknown module", "`reward_functions.0.path`", (rf("no_such_module:score"),)),
    Case("reward function: unknown function", "`reward_functions.0.path`", (rf("ppoflow.toy:no_such_function"),)),
    Case("reward function: not an import path", "`reward_functions.0.path`", (rf("oracle_score"),)),
    Case("config file missing", "`--config`", config_file="missing"),
    Case("config file not YAML", "`--config`", config_file="broken"),
    Case("output_dir not writable", "`output_dir`", ("output_dir=/proc/ppoflow-run",)),
    Case("output_dir holds another config's run", "`output_dir`", prepare=_another_configs_checkpoint),
    Case("output_dir with {flow_run} outside a flow", "`output_dir`", ("output_dir=runs/{{flow_run}}",)),
    Case("output_dir with an unbalanced brace", "`output_dir`", ("output_dir=runs/{{date",)),
    # -- models ----------------------------------------------------------------------------------
    Case("policy path missing", "`models.policy`", ("models.policy=/no/such/policy",)),
    Case("policy path is a file", "models.policy:", ("models.policy={toy}/prompts.jsonl",)),
    Case("policy dir without config.json", "models.policy:", ("models.policy={bad}/no-config",)),
    Case(
        "policy not on disk nor in the offline Hub cache",
        "models.policy:",
        ("models.policy=acme-ml/not-cached-policy",),
    ),
    Case("policy is not a causal LM", "models.policy:", ("models.policy={toy}/reward",)),
    Case("reward is not a sequence classifier", "models.reward:", ("models.reward={toy}/policy",)),
    Case("reward with num_labels=2", "models.reward:", ("models.reward={bad}/two-labels",)),
    Case("value neither a sequence classifier nor a causal LM", "models.value:", ("models.value={bad}/base-model",)),
    Case("value tokenizer differs from the policy's", "models.value:", ("models.value={bad}/other-vocab",)),
    Case("tokenizer without EOS", "models.policy:", ("models.policy={bad}/no-eos",)),
    Case("LoRA target modules absent", "peft.target_modules:", ("peft.enabled=true", "peft.target_modules=[c_attn]")),
    Case("weights not in safetensors", "models.policy", ("models.policy={bad}/pickle-only",)),
    Case("registry URI malformed", "`models.policy`", ("models.policy=models:/policy@",)),
    Case("registry version that does not exist", "models.policy:", ("models.policy=models:/no-such-policy/3",)),
    Case(
        "policy fallback without a registry alias", "`models.policy_fallback`", ("models.policy_fallback={toy}/policy",)
    ),
    # -- data ------------------------------------------------------------------------------------
    Case("data path missing", "`data.path`", ("data.path=/no/such/prompts.jsonl",)),
    Case("data file of unknown type", "data.path:", ("data.path={bad}/prompts.csv",)),
    Case("data file not valid JSON lines", "data.path:", ("data.path={bad}/broken.jsonl",)),
    Case("data file empty", "data.path:", ("data.path={bad}/empty.jsonl",)),
    Case("prompt column missing", "`data.prompt_column`", ("data.prompt_column=text",)),
    Case("prompts that are not text", "data.prompt_column:", ("data.path={bad}/numbers.jsonl",)),
    Case("prompts all empty", "data.prompt_column:", ("data.path={bad}/blank.jsonl",)),
    Case("prompts all too long", "`data.max_prompt_length`", ("data.max_prompt_length=2",)),
    Case(
        "prompts all ending with EOS, dropped",
        "`data.eos_prompts`",
        ("data.path={bad}/eos.jsonl", "data.eos_prompts=drop"),
    ),
    Case("eval split larger than the data", "`data.eval_size`", ("data.path={bad}/few.jsonl", "data.eval_size=40")),
    Case("chat template file missing", "`data.chat_template`", ("data.chat_template=/no/such/template.jinja",)),
    Case("conversations without a chat template", "`data.chat_template`", ("data.path={bad}/conversations.jsonl",)),
    Case(
        "conversations with the chat template off",
        "`data.chat_template`",
        ("data.path={bad}/conversations.jsonl", "data.chat_template=none"),
    ),
    Case(
        "chat template file in another encoding",
        "`data.chat_template`",
        ("data.path={bad}/conversations.jsonl", "data.chat_template={bad}/latin-1.jinja"),
    ),
    Case(
        "chat template that does not render",
        "`data.chat_template`",
        ("data.path={bad}/conversations.jsonl", "data.chat_template={bad}/broken.jinja"),
    ),
    Case("text and conversations mixed", "data.prompt_column:", ("data.path={bad}/mixed.jsonl",)),
    Case("messages without content", "data.prompt_column:", ("data.path={bad}/no-content.jsonl",)),
    Case("conversation that is only the reply", "data.prompt_column:", ("data.path={bad}/reply-only.jsonl",)),
    Case("data glob matching no partition", "data.path:", ("data.path={bad}/nightly-*.jsonl",)),
    Case("data window on a single file", "`data.window`", ("data.window={{newest: 2}}",)),
    Case(
        "data window by days on undated partitions",
        "`data.window`",
        ("data.path={bad}/shards", "data.window={{days: 3}}"),
    ),
    # -- tracking (the flow) ---------------------------------------------------------------------
    Case(
        "tracking server unreachable",
        "MLFLOW_TRACKING_URI=",
        command="run",
        tracking_uri="http://127.0.0.1:{closed_port}",
        before_prefect=True,
    ),
    Case(
        "tracking file store",
        "MLFLOW_TRACKING_URI=",
        command="run",
        tracking_uri="file:///tmp/mlruns",
        before_prefect=True,
    ),
    Case(
        "tracking store not writable",
        "MLFLOW_TRACKING_URI=",
        command="run",
        tracking_uri="sqlite:////proc/ppoflow/mlflow.db",
        before_prefect=True,
    ),
    Case(
        "output_dir with an unknown placeholder",
        "`output_dir`",
        ("output_dir=runs/{{foo}}",),
        command="run",
        before_prefect=True,
    ),
    Case(
        "registered model name MLflow refuses",
        "`tracking.registered_model_name`",
        ("tracking.registered_model_name=team/policy",),
        command="run",
    ),
    Case("registry alias MLflow reserves", "`tracking.alias`", ("tracking.alias=latest",), command="run"),
    Case(
        "promotion alias MLflow reserves",
        "`tracking.promotion.alias`",
        ("tracking.promotion.alias=latest",),
        command="run",
    ),
    Case("promotion alias equal to the candidate alias", "`tracking`", ("tracking.promotion.alias=candidate",)),
    Case(
        "promotion bound on an unknown reward function",
        "`tracking.promotion.min_reward_functions.nope`",
        ("tracking.promotion.min_reward_functions={{nope: 0.5}}",),
    ),
    Case(
        "approval with nothing registered",
        "`tracking.promotion.approval`",
        ("tracking.promotion.approval=required", "tracking.log_model=false"),
    ),
    Case(
        "approval with no registered model name",
        "`tracking.registered_model_name`",
        ("tracking.promotion.approval=required", "tracking.registered_model_name=''"),
    ),
    Case(
        "approval with no promotion alias",
        "`tracking.promotion.alias`",
        ("tracking.promotion.approval=required", "tracking.promotion.alias=''"),
    ),
    Case(
        "approval timeout not positive",
        "`tracking.promotion.approval_timeout_hours`",
        ("tracking.promotion.approval=required", "tracking.promotion.approval_timeout_hours=0"),
    ),
    Case("experiment deleted", "`tracking.experiment`", ("tracking.experiment=deleted-experiment",), command="run"),
    Case(
        "push to the Hub while offline",
        "`tracking.push_to_hub`",
        ("tracking.push_to_hub=true", "tracking.hub_repo_id=org/policy"),
        command="run",
    ),
]


@pytest.fixture(scope="module")
def bad(toy_world, tmp_path_factory) -> Path:
    """Models and prompt files that are wrong in one way each."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("bad-input")
    shutil.copytree(toy_world / "policy", root / "no-config")
    (root / "no-config" / "config.json").unlink()

    two = AutoConfig.from_pretrained(toy_world / "reward")
    two.num_labels = 2
    AutoModelForSequenceClassification.from_config(two).save_pretrained(root / "two-labels")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_world / "reward" / name, root / "two-labels" / name)

    shutil.copytree(toy_world / "reward", root / "other-vocab")
    tokenizer = json.loads((root / "other-vocab" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["review"] = vocab.pop("a")  # same size, one word different
    (root / "other-vocab" / "tokenizer.json").write_text(json.dumps(tokenizer))

    shutil.copytree(toy_world / "policy", root / "no-eos")
    settings = json.loads((root / "no-eos" / "tokenizer_config.json").read_text())
    del settings["eos_token"]
    (root / "no-eos" / "tokenizer_config.json").write_text(json.dumps(settings))

    import torch
    from safetensors.torch import load_file

    shutil.copytree(toy_world / "policy", root / "pickle-only")
    torch.save(load_file(root / "pickle-only" / "model.safetensors"), root / "pickle-only" / "pytorch_model.bin")
    (root / "pickle-only" / "model.safetensors").unlink()

    from transformers import AutoModel

    # no head at all
    AutoModel.from_config(AutoConfig.from_pretrained(toy_world / "policy")).save_pretrained(root / "base-model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_world / "policy" / name, root / "base-model" / name)

    lines = {
        "prompts.csv": "prompt\nhello\n",
        "broken.jsonl": '{"prompt": "fine"}\n{"prompt": \n',
        "empty.jsonl": "",
        "numbers.jsonl": "".join(json.dumps({"prompt": i}) + "\n" for i in range(50)),
        "blank.jsonl": "".join(json.dumps({"prompt": "   "}) + "\n" for _ in range(50)),
        "eos.jsonl": "".join(
            json.dumps({"prompt": f"the movie was good <eos>{' ' * (i % 3)}"}) + "\n" for i in range(50)
        ),
        "few.jsonl": "".join(json.dumps({"prompt": f"review number {i} :"}) + "\n" for i in range(40)),
        "conversations.jsonl": "".join(
            json.dumps({"messages": [user(f"review number {i} :"), reply("great .")]}) + "\n" for i in range(50)
        ),
        "broken.jinja": "{% for message in messages %}",
        "accelerate-fsdp.yaml": "distributed_type: FSDP\nnum_machines: 1\nfsdp_config:\n  fsdp_version: 2\n",
        "accelerate-two-nodes.yaml": (
            "distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 0\nmain_process_ip: 10.0.0.1\n"
        ),
        "accelerate-deepspeed.yaml": (
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n"
            "  offload_optimizer_device: cpu\nnum_machines: 1\n"
        ),
        "accelerate-offload.yaml": (
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_offload_params: true\n  fsdp_version: 2\nnum_machines: 1\n"
        ),
        "mixed.jsonl": json.dumps({"prompt": "review :"}) + "\n" + json.dumps({"prompt": [user("review :")]}) + "\n",
        "no-content.jsonl": json.dumps({"prompt": [{"role": "user", "text": "review :"}]}) + "\n",
        "reply-only.jsonl": json.dumps({"messages": [reply("great .")]}) + "\n",
    }
    (root / "shards").mkdir()
    lines |= {f"shards/part-{i}.jsonl": json.dumps({"prompt": f"review number {i} :"}) + "\n" for i in range(2)}
    for name, text in lines.items():
        (root / name).write_text(text)
    (root / "accelerate.yaml.gz").write_bytes(gzip.compress(b"distributed_type: MULTI_GPU\nnum_machines: 1\n"))
    (root / "latin-1.jinja").write_bytes(
        "{% for m in messages %}{{ m['content'] }} — café{% endfor %}".encode("latin-1", "replace")
    )
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """The MLflow store every case runs against, with one deleted experiment in it."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('bad-input-mlflow') / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("deleted-experiment"))
    return uri


@pytest.fixture(scope="module")
def prefect():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def ppoflow(argv: list[str]) -> tuple[int, str, str]:
    """The installed `ppoflow` command (ppoflow.flows.cli:main), in this process."""
    from ppoflow.flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def flow_ready(request, case: Case) -> Iterator[None]:
    if case.command == "run" and not case.before_prefect:
        request.getfixturevalue("prefect")
    yield


@pytest.fixture(
    params=[pytest.param(case, marks=[pytest.mark.flow] if case.command == "run" else []) for case in CASES],
    ids=[case.id.replace(" ", "-") for case in CASES],
)
def case(request) -> Case:
    return request.param


def test_bad_input_is_refused_in_one_clear_line_before_any_work(
    case,
    flow_ready,
    toy_world,
    bad,
    store,
    closed_port,
    tmp_path,
    monkeypatch,
    bad_input_verdict,
):
    output_dir = tmp_path / "run"
    names = {"toy": toy_world, "bad": bad, "closed_port": closed_port}
    overrides = [override.format(**names) for override in case.overrides]
    config_path = write_config(
        reliability_config(toy_world, output_dir, *_flow_settings(case)), tmp_path / "config.yaml"
    )
    if case.config_file == "missing":
        config_path = tmp_path / "no-such-config.yaml"
    elif case.config_file == "broken":
        config_path.write_text("models: [unclosed\n")
    if case.prepare:
        case.prepare(output_dir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (case.tracking_uri or store).format(**names))
    bad_input_verdict.update(kind=case.command, expected_field=case.expected)

    code, stdout, stderr = ppoflow(
        [case.command, "--config", str(config_path), *[f"--set={text}" for text in overrides]]
    )

    lines = error_lines(stderr)
    bad_input_verdict["message"] = lines[0] if lines else stderr.strip().splitlines()[-1:]
    assert code == 2, stderr[-2000:]
    assert stdout == ""
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]  # a flow run's refusal too: Prefect logs its line, not its frames
    assert case.expected in lines[0] and " — " in lines[0], lines[0]
    assert not (output_dir / "checkpoints" / "step-000000").exists() or case.prepare is not None
    assert not (output_dir / "final").exists()
    assert mlflow.MlflowClient(tracking_uri=store).search_registered_models() == []


def _flow_settings(case: Case) -> tuple[str, ...]:
    return (
        ("tracking.system_metrics=false", "flow.retries=0", "tracking.registered_model_name=bad-input-policy")
        if case.command == "run"
        else ()
    )
