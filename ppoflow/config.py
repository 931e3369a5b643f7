"""The run configuration: one pydantic model, loaded from YAML, with dotted `--set` overrides.

PPO hyperparameters keep TRL's `PPOConfig` names and batch arithmetic so configs port over.
Unknown keys are refused (`extra="forbid"`), and every validation failure becomes a one-line
`ConfigError` naming the dotted field and the fix, before any model is loaded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from ppoflow.errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[1-9][0-9]*))")
MODEL_SOURCE_FIELDS = ("policy", "reward", "value", "ref", "tokenizer", "policy_fallback")  # models.* naming a model
CHAT_TEMPLATE_CHOICES = ("auto", "none")  # data.chat_template: any other value is a template file
OUTPUT_DIR_PLACEHOLDERS = ("date", "flow_run")  # what output_dir may hold in braces (`expand_output_dir`)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


# Sections that say how one attempt runs, not what it computes: outside config_hash.
ATTEMPT_SECTIONS = ("tracking", "flow", "runtime")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelsConfig(_Section):
    """Where the four models come from. Each is a local directory, a Hugging Face Hub id, or a model of the
    MLflow Model Registry (`models:/NAME@ALIAS` or `models:/NAME/VERSION`, resolved in stage 2 against
    the run's tracking store to one version, fetched once into `output_dir/registry/`)."""

    policy: str = Field(description="The SFT checkpoint the policy starts from (causal LM).")
    reward: str = Field(
        description=(
            "A sequence classifier with num_labels=1 (the reward model), with the policy's "
            "tokenizer or its own (prompt + response are then re-encoded as text for it)."
        )
    )
    value: str | None = Field(
        None,
        description=(
            "Value model start: a one-label classifier, or a causal LM (its decoder, "
            "a fresh scalar head), with the policy's tokenizer; default: the reward "
            "checkpoint, or the policy when the reward model has its own tokenizer."
        ),
    )
    policy_fallback: str | None = Field(
        None,
        description="Where the policy starts while models.policy names a registry alias that points at no version "
        "yet (the first run of a chain that continues from `models:/NAME@champion`): a local directory or Hub id.",
    )
    ref: str | None = Field(
        None,
        description="Frozen reference; default: the policy checkpoint (with a registry "
        "policy: the version it resolved to, so KL is measured from where this run started). Unused with LoRA.",
    )
    tokenizer: str | None = Field(None, description="Tokenizer source; default: the policy checkpoint.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for Hub ids.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype of every forward (autocast) and storage dtype of the frozen models; "
        "auto = bf16 on a GPU that supports it, else fp32. Trained weights and optimizer state stay fp32.",
    )
    frozen_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Storage dtype of the frozen reference (not a LoRA base: that is the policy) and reward "
        "models; null = models.dtype. bfloat16 halves their memory (they run in it whatever the compute dtype), "
        "at the cost of bf16-rounded reference log-probs and scores.",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with a Hub checkpoint.")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description="Attention kernel of every model: auto = transformers' default for the device (sdpa where the "
        "family has it); flash_attention_2 needs CUDA and the flash-attn package. Packing is used only where the "
        "start-up self-check passes with the chosen kernel (several packed rows), else padded rows.",
    )


class DataWindow(_Section):
    """Which partitions of a partitioned `data.path` are read: exactly one of `newest` and `days`."""

    newest: int | None = Field(None, gt=0, description="The newest N partitions (all of them when there are fewer).")
    days: int | None = Field(
        None,
        gt=0,
        description=(
            "The partitions dated within the last N days, counted back from the newest partition's date, not from "
            "today's, so a re-run reads the same files (days: 1 is the newest date alone). Needs dated names."
        ),
    )

    @model_validator(mode="after")
    def _one_rule(self) -> DataWindow:
        if (self.newest is None) == (self.days is None):
            raise ValueError("set exactly one of newest and days, like {newest: 7} or {days: 7}")
        return self


class DataConfig(_Section):
    """The prompt dataset."""

    path: str = Field(
        description="JSONL or Parquet file, a saved dataset directory, a directory of dated partition files "
        "(prompts-2026-12-01.jsonl, ...) or a glob of them (data/prompts-*.jsonl), or a Hub dataset id."
    )
    window: DataWindow | None = Field(
        None, description="Partitions read from a partitioned data.path: null = all of them, {newest: N} or {days: N}."
    )
    prompt_column: str = Field(
        "prompt",
        description="Column holding the prompts: text, or conversations as TRL writes them (lists of {role, content} "
        "messages). A column named `messages` is TRL's language-modeling format: its final assistant turn is dropped. "
        "With the default and no `prompt` column, a `messages` column is used.",
    )
    split: str = Field("train", description="Split to read from a Hub dataset or saved DatasetDict.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    max_prompt_length: int = Field(64, gt=0, description="Prompts longer than this many tokens are dropped.")
    eval_size: int = Field(64, ge=0, description="Prompts held out (deterministically) for evaluation.")
    eos_prompts: Literal["strip", "drop"] = Field(
        "strip", description="What to do with prompts that end with the EOS token."
    )
    chat_template: str = Field(
        "auto",
        description="How conversations become prompt text: auto (the policy tokenizer's chat template), none "
        "(conversations are refused), or a Jinja template file used instead of the tokenizer's. Text prompts are "
        "used as they are.",
    )


class PPOConfig(_Section):
    """PPO hyperparameters, with TRL `PPOConfig` names and meanings."""

    total_episodes: int = Field(1024, gt=0, description="Number of prompts to roll out over the whole run.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Largest micro-batch per process.")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Rollout batch per process = per_device_train_batch_size × this (TRL's meaning)."
    )
    num_ppo_epochs: int = Field(4, gt=0, description="Passes over each rollout batch.")
    num_mini_batches: int = Field(1, gt=0, description="Mini-batches per epoch; one optimizer step each.")
    local_rollout_forward_batch_size: int = Field(64, gt=0, description="Prompts per generate/forward chunk.")
    pack_sequences: bool = Field(
        True,
        description="Pack prompt+response sequences end to end (no padding) in the scoring forwards and training; "
        "falls back to padded batches, with a warning, for models that ignore packed position ids.",
    )
    response_length: int = Field(53, gt=0, description="Maximum new tokens per response.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the policy's and value model's activations in backward instead of keeping them: "
        "far less memory at real sizes, about a third more training compute; same gradients.",
    )
    stop_token: Literal["eos"] | None = Field(
        None,
        description="TRL's meaning: 'eos' ends (and truncates) each response at its first EOS; null (TRL's default), "
        "with no stop_token_id, generates the full response_length and truncates nothing.",
    )
    stop_token_id: int | None = Field(
        None, ge=0, description="Token id that ends (and truncates) each response; exclusive with stop_token."
    )
    temperature: float = Field(0.7, gt=0, description="Sampling temperature for rollouts.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1.0 disables.")
    missing_eos_penalty: float | None = Field(
        None,
        ge=0,
        description="Subtracted from the score of responses that do not end with the stop token "
        "(with no stop token: that contain no EOS, as TRL).",
    )
    kl_coef: float = Field(0.05, ge=0, description="Weight of the per-token KL penalty.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="KL estimator: k1 (log-ratio) or k3 (unbiased, >= 0).")
    cliprange: float = Field(0.2, gt=0, description="PPO policy ratio clip range.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    cliprange_value: float = Field(0.2, gt=0, description="Value prediction clip range.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_rewards: bool = Field(False, description="Whiten per-token rewards before GAE.")
    learning_rate: float = Field(3e-6, gt=0, description="Peak AdamW learning rate (policy and value).")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule over all optimizer steps."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of optimizer steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Global gradient-norm clip; null disables.")
    seed: int = Field(42, ge=0, description="Seeds data order, sampling and initialisation.")
    checkpoint_every: int = Field(10, gt=0, description="Write a checkpoint every this many updates (and at the end).")
    eval_every: StrictInt | None = Field(  # strict: `true` would read as 1, an evaluation every update
        None,
        gt=0,
        description=(
            "Evaluate the policy against the reference on the held-out prompts (data.eval_size) every this many "
            "updates and at the last one, as stage 6 does: its eval.json keys as `eval/<key>` (eval/win_rate, "
            "eval/kl, eval/reward_policy, eval/oracle_policy, ...) in that update's metrics (metrics.jsonl; MLflow "
            "at step = update). Each costs one stage-6 evaluation; it draws no random number training uses, so the "
            "trained weights are the same with or without it. null: only stage 6 evaluates, once, after training."
        ),
    )
    keep_checkpoints: int = Field(2, gt=0, description="Newest complete checkpoints kept on disk.")


class PeftConfig(_Section):
    """LoRA on the policy. The base model with the adapter disabled serves as reference."""

    enabled: bool = Field(False, description="Train a LoRA adapter instead of all policy weights.")
    r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(16, gt=0, description="LoRA scaling numerator.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names LoRA wraps (the last part of a module's name, e.g. [q_proj, v_proj]), or "
        "`all-linear`: peft's choice of every linear layer (nn.Linear and GPT-2's Conv1D) but the LM head. The "
        "default because it exists in every family, fused projections included (GPT-2 c_attn, GPT-NeoX "
        "query_key_value, Phi-3 qkv_proj), while q_proj/v_proj exist only in Llama-style ones.",
    )
    merge_on_save: bool = Field(False, description="Also save the adapter merged into the base weights.")


class RewardFunctionConfig(_Section):
    """A Python reward function `module:function` with signature (prompts, completions) -> list[float]."""

    path: str = Field(description="Import path, `package.module:function`.")
    weight: float = Field(0.0, description="Added to the score with this weight; 0 = logged as a metric only.")
    name: str | None = Field(None, description="Metric name; default: the function's name.")

    @field_validator("path")
    @classmethod
    def _import_path(cls, value: str) -> str:
        if not re.fullmatch(r"[\w.]+:[\w]+", value):
            raise ValueError("must look like `package.module:function`")
        return value

    @property
    def metric_name(self) -> str:
        return self.name or self.path.split(":")[1]


class EvalConfig(_Section):
    """Evaluation of the trained policy against the reference on the held-out prompts."""

    batch_size: int = Field(64, gt=0, description="Prompts per evaluation generate call.")
    sample_table_size: int = Field(16, ge=0, description="Rows in the sample-completions table.")
    seed: int = Field(1234, ge=0, description="Sampling seed, the same for policy and reference.")


class PromotionConfig(_Section):
    """The gate a new version passes to take the promotion alias (stage 6, after registration)."""

    alias: str = Field("champion", description="Alias the gate moves to a new version that passes every bound.")
    min_win_rate: float = Field(
        0.55,
        ge=0,
        le=1,
        description="Least win rate (by the reward model, ties half) of the new policy against the "
        "alias's current holder on the eval prompts, head to head; against the reference while no version holds it.",
    )
    max_kl: float | None = Field(
        None, ge=0, description="Most mean per-sequence KL(policy‖reference) on the eval prompts; null: no bound."
    )
    min_reward_functions: dict[str, float] = Field(
        default_factory=dict,
        description="Least eval mean of the new policy per reward function, by metric name "
        "(e.g. {oracle: 0.5}); each must name one of reward_functions.",
    )
    approval: Literal["none", "required"] = Field(
        "none",
        description="`required`: a version that passes every bound waits for a person's decision (the flow run "
        "suspends with a form in the Prefect UI; `ppoflow approve|reject RUN_ID` answers it too) before it takes "
        "the alias; `none`: the numbers alone decide.",
    )
    approval_timeout_hours: float = Field(
        72.0,
        gt=0,
        description="Hours a version awaits its decision (approval: required); then it is rejected as timed out.",
    )


class TrackingConfig(_Section):
    """MLflow tracking (used by `ppoflow run`). The tracking URI comes from MLFLOW_TRACKING_URI."""

    experiment: str = Field("ppoflow", description="MLflow experiment name.")
    registered_model_name: str = Field("ppoflow-policy", description="Model Registry name of the trained policy.")
    alias: str = Field("candidate", description="Alias given to every newly registered version.")
    promotion: PromotionConfig | None = Field(
        default_factory=PromotionConfig,
        description="The promotion gate (with log_model): the new version takes "
        "promotion.alias only when it beats the holder and every bound holds; null: no gate, no promotion alias.",
    )
    log_model: bool = Field(True, description="Log and register the trained policy.")
    system_metrics: bool = Field(True, description="Log CPU/memory system metrics during the run.")
    push_to_hub: bool = Field(
        False,
        description="Push final/ (or the LoRA adapter) with a lineage model card to the Hugging Face Hub after "
        "registration (`ppoflow run`); the token comes from HF_TOKEN or `hf auth login`, never from the config.",
    )
    hub_repo_id: str | None = Field(None, description="Hub repository for push_to_hub, `owner/name`.")
    hub_private: bool = Field(
        True, description="Create the Hub repository as private (an existing one keeps its visibility)."
    )
    hub_retry_delay_seconds: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [2.0, 10.0],
        description="Waits before each retry of a failed Hub push (one retry per "
        "entry; [] pushes once); after the last, stage 6 fails and the registered version is kept.",
    )

    @model_validator(mode="after")
    def _hub_repo(self) -> TrackingConfig:
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("push_to_hub needs tracking.hub_repo_id (e.g. my-org/my-policy)")
        if self.hub_repo_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.hub_repo_id):
            raise ValueError(f"hub_repo_id must be `owner/name`, like my-org/my-policy (got {self.hub_repo_id!r})")
        if self.promotion is not None and self.promotion.alias == self.alias:
            raise ValueError(
                f"promotion.alias and alias are both {self.alias!r}: every new version takes `alias`, "
                "only one that passes the gate `promotion.alias` — give them different names"
            )
        return self


class FlowConfig(_Section):
    """Orchestration knobs for the Prefect flow; they never change results."""

    retries: int = Field(2, ge=0, description="Retries of each stage after a transient failure.")
    retry_delay_seconds: list[float] = Field(
        default_factory=lambda: [2.0, 10.0, 30.0], description="Backoff between retries."
    )
    result_storage: str | None = Field(
        None, description="Where stage results are persisted; default: .ppoflow/prefect-results."
    )
    lock_timeout_seconds: float | None = Field(
        None,
        ge=0,
        description="How long a run (flow or `ppoflow train`) waits for another run holding its "
        "output_dir before failing; null waits as long as it takes, 0 fails at once.",
    )


class RuntimeConfig(_Section):
    """How this machine runs the job; not part of its identity (config_hash), so a resume may change
    it — but a bitwise resume needs the same settings."""

    deterministic: bool = Field(
        True,
        description=(
            "Deterministic kernels: torch.use_deterministic_algorithms, cuDNN deterministic without autotuning, "
            "CUBLAS_WORKSPACE_CONFIG=:4096:8 (unless set). Needed for bitwise resume on a GPU; off is faster there."
        ),
    )
    num_threads: int | None = Field(
        None,
        gt=0,
        description="torch CPU threads per process; null = torch's default (OMP_NUM_THREADS, else the cores).",
    )
    collective_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description=(
            "How long a process waits in a collective (an all-reduce, a barrier) for the others before it "
            "fails: a rank that hangs (a lost machine, a stuck GPU) then ends the group, and the task's "
            "retry resumes, instead of holding every GPU until someone notices. Must exceed the longest "
            "stretch one process works alone while the others wait: the main process's checkpoint writes and "
            "periodic evaluation (ppo.eval_every). null: torch's default (30 minutes for gloo, 10 for NCCL)."
        ),
    )
    num_processes: int = Field(
        1,
        gt=0,
        description=(
            "Training processes in all, over every machine of runtime.accelerate_config (one per GPU, "
            "or gloo processes on a CPU). 1: the calling process. More: `ppoflow run` runs stages 4 "
            "and 5 under `accelerate launch`, a child process group of the task; `ppoflow train` must "
            "itself be started by `accelerate launch --num_processes` with as many."
        ),
    )
    fsdp: bool = Field(
        False,
        description=(
            "Fully sharded training (torch FSDP2, FULL_SHARD) of the policy and the value model over "
            "the processes: each decoder layer (the classes in the model's `_no_split_modules`) and the "
            "root are sharded, all-gathered for their forward and backward, their gradients and AdamW "
            "state kept in shards; the reference and the reward model as runtime.fsdp_frozen says. "
            "Needs runtime.num_processes > 1. False: each process holds both models whole (DDP). "
            "Checkpoints hold full weights either way, but resume only with the setting that wrote them."
        ),
    )
    fsdp_frozen: bool = Field(
        False,
        description=(
            "With runtime.fsdp: shard the reference and the reward model too (FULL_SHARD, each decoder layer "
            "all-gathered for its forward and freed after it), so that no process holds them whole; the rollout's "
            "reference and reward forwards then run in step on every process, and the periodic evaluation "
            "(ppo.eval_every) gathers them whole for its duration. False: they stay whole on every process (no "
            "collective in their forwards). Changes no number: a run may resume with the other setting."
        ),
    )
    accelerate_config: Path | None = Field(
        None,
        description=(
            "An `accelerate config` YAML for the processes `ppoflow run` launches (stages 4 and 5 when "
            "num_processes > 1): `gpu_ids` (e.g. 0,1,2,3 to train on half of an 8-GPU node), "
            "`distributed_type: FSDP` (ppoflow's own FSDP2 sharding, as runtime.fsdp: true; its fsdp_config "
            "keys done as they say or refused), `distributed_type: DEEPSPEED` with deepspeed_config.zero_stage "
            "1, 2 or 3 (the deepspeed extra; ppoflow/backends/zero.py), and `num_machines` > 1 with `main_process_ip` "
            "(this file is the main machine's, machine_rank 0; the others run `ppoflow join`). ppoflow sets the "
            "number of processes, the port (unless the file gives one for several machines), mixed precision "
            "(no: precision is models.dtype) and dynamo (no) itself, and launches plain processes. Checked in "
            "stage 1, one line a refusal (docs/SCALING.md). `ppoflow train` is started by accelerate launch, "
            "which takes the file itself (--config_file); ppoflow still reads its FSDP or DeepSpeed settings."
        ),
    )
    keep_archives: int | None = Field(
        None,
        ge=0,
        description=(
            "Archived trainings kept in OUTPUT/archive/ (stage 3 moves a workspace's training of other data or models "
            "there), newest first: older ones are deleted after each archiving. null keeps them all; 0 keeps none."
        ),
    )


class RunConfig(_Section):
    """A whole ppoflow run."""

    output_dir: Path = Field(
        Path("runs/toy"),
        description=(
            "Run workspace: checkpoints, metrics, final model. May hold `{date}` and `{flow_run}`, expanded when the "
            "run starts (`expand_output_dir`): under `ppoflow run` (the flow), `{date}` is the UTC day (YYYY-MM-DD) "
            "of the flow run's scheduled start time and `{flow_run}` the flow run's id (a UUID; its name comes from "
            "the config hash, so it is no different between two scheduled runs); both stay the same when that flow "
            "run is retried (`prefect flow-run retry`, stage retries), so a retry resumes in the same workspace, "
            "while a new flow run gets a new `{flow_run}`. `ppoflow train` has no flow run: `{date}` is today's UTC "
            "day when it starts and `{flow_run}` is refused. Braces are kept for these two placeholders."
        ),
    )
    models: ModelsConfig
    data: DataConfig
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    reward_functions: list[RewardFunctionConfig] = Field(default_factory=list)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("output_dir")
    @classmethod
    def _known_placeholders(cls, value: Path) -> Path:
        output_dir_placeholders(value)
        return value

    @model_validator(mode="after")
    def _eval_prompts_for_eval_every(self) -> RunConfig:
        if self.ppo.eval_every is not None and self.data.eval_size == 0:
            raise ConfigError(
                "ppo.eval_every",
                f"is {self.ppo.eval_every} and data.eval_size is 0: there are no held-out prompts to evaluate on",
                "hold out prompts (data.eval_size > 0) or set ppo.eval_every: null",
            )
        return self

    @model_validator(mode="after")
    def _fsdp_needs(self) -> RunConfig:
        # With an accelerate config asking for FSDP, stage 1 checks the same (runtime.check_sharding_plan).
        if not self.runtime.fsdp:
            return self
        if self.runtime.num_processes < 2:
            raise ConfigError(
                "runtime.fsdp",
                f"is true and runtime.num_processes is {self.runtime.num_processes}: there is nothing to shard over",
                "set runtime.num_processes to 2 or more (one process per GPU), or runtime.fsdp: false",
            )
        if self.peft.enabled:
            raise ConfigError(
                "runtime.fsdp",
                "is true and peft.enabled is true: LoRA with FSDP is not built",
                "set runtime.fsdp: false (LoRA's few trained weights fit on every process) or peft.enabled: false",
            )
        return self

    @model_validator(mode="after")
    def _eval_prompts_for_promotion(self) -> RunConfig:
        if self.data.eval_size == 0 and self.tracking.log_model and self.tracking.promotion is not None:
            raise ConfigError(
                "data.eval_size",
                "is 0, and the promotion gate (tracking.promotion) judges the trained policy on held-out prompts",
                "hold out prompts (data.eval_size > 0, default 64) or set tracking.promotion: null",
            )
        return self

    @model_validator(mode="after")
    def _approval_has_a_version_and_alias(self) -> RunConfig:
        tracking = self.tracking
        if tracking.promotion is None or tracking.promotion.approval != "required":
            return self
        if not tracking.log_model:
            raise ConfigError(
                "tracking.promotion.approval",
                "is required and tracking.log_model is false: no version is registered for a person to approve",
                "set tracking.log_model: true, or tracking.promotion.approval: none",
            )
        for field, value in (
            ("tracking.registered_model_name", tracking.registered_model_name),
            ("tracking.promotion.alias", tracking.promotion.alias),
        ):
            if not (value or "").strip():
                raise ConfigError(
                    field,
                    "is empty and tracking.promotion.approval is required: a person approves a registered "
                    "version for the alias",
                    "name it (e.g. the defaults ppoflow-policy and champion), or set tracking.promotion.approval: none",
                )
        return self

    @model_validator(mode="after")
    def _promotion_bounds(self) -> RunConfig:
        promotion = self.tracking.promotion
        names = [function.metric_name for function in self.reward_functions]
        for name in promotion.min_reward_functions if promotion is not None else ():
            if name not in names:
                raise ConfigError(
                    f"tracking.promotion.min_reward_functions.{name}",
                    "names no reward function",
                    f"use one of {names} (reward_functions[].name)"
                    if names
                    else "add the function to reward_functions first",
                )
        return self

    def config_hash(self) -> str:
        """Identity of the training job: everything that changes its results, not where they are written
        (output_dir: a workspace copied elsewhere resumes), tracking, retries or how this machine runs it."""
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        """The fields `config_hash` covers, as JSON values."""
        return self.model_dump(mode="json", exclude={*ATTEMPT_SECTIONS, "output_dir"})

    def with_absolute_paths(self) -> RunConfig:
        """output_dir and the local model and data paths made absolute (Hub ids and registry URIs kept):
        the config hash and cache keys must not depend on the directory a run happens to start in."""
        models = {field: _absolute(getattr(self.models, field)) for field in MODEL_SOURCE_FIELDS}
        update: dict[str, Any] = {
            "output_dir": self.output_dir.expanduser().resolve(),
            "models": self.models.model_copy(update=models),
            "data": self.data.model_copy(update={"path": _absolute(self.data.path)}),
        }
        if self.flow.result_storage:
            update["flow"] = self.flow.model_copy(
                update={"result_storage": str(Path(self.flow.result_storage).expanduser().resolve())}
            )
        return self.model_copy(update=update)


def _absolute(source: str | None) -> str | None:
    """A path that exists locally, made absolute; a Hub id, a registry URI (or None) unchanged."""
    if source is None or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


def config_differences(before: dict[str, Any], after: dict[str, Any], limit: int = 4) -> list[str]:
    """`field: old -> new` for each dotted field whose value differs between two config identities
    (`RunConfig.identity`), at most `limit` of them."""

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        return {
            key: value for name, child in tree.items() for key, value in flat(child, f"{prefix}{name}.").items()
        } or {prefix: {}}

    old, new = flat(before), flat(after)
    changed = [
        f"{key.rstrip('.')}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]
    return changed[:limit] + ([f"and {len(changed) - limit} more"] if len(changed) > limit else [])


def output_dir_placeholders(output_dir: str | Path) -> set[str]:
    """The placeholders (`date`, `flow_run`) in an output_dir; ValueError for an unknown one or a stray brace."""
    text = str(output_dir)
    names = set(_PLACEHOLDER.findall(text))
    unknown = sorted(names - set(OUTPUT_DIR_PLACEHOLDERS))
    if unknown:
        raise ValueError(
            f"has an unknown placeholder {{{unknown[0]}}}: output_dir may hold only {{date}} and {{flow_run}}"
        )
    if set("{}") & set(_PLACEHOLDER.sub("", text)):
        raise ValueError("has an unbalanced brace: braces are only for the placeholders {date} and {flow_run}")
    return names


def expand_output_dir(config: RunConfig, *, scheduled_start: datetime, flow_run: str | None) -> RunConfig:
    """`config` with `{date}` in output_dir replaced by the UTC day of `scheduled_start` (YYYY-MM-DD; a
    naive time is taken as UTC) and `{flow_run}` by `flow_run`, the orchestrator's run id. None means
    there is no flow run (`ppoflow train`): `{flow_run}` is then refused."""
    names = output_dir_placeholders(config.output_dir)
    if not names:
        return config
    if "flow_run" in names and flow_run is None:
        raise ConfigError(
            "output_dir",
            f"{config.output_dir} holds {{flow_run}} and `ppoflow train` runs outside any flow run",
            "use `ppoflow run` (the Prefect flow), or put {date} or a fixed name there",
        )
    day = (scheduled_start if scheduled_start.tzinfo else scheduled_start.replace(tzinfo=timezone.utc)).astimezone(
        timezone.utc
    )
    values = {"date": day.strftime("%Y-%m-%d"), "flow_run": flow_run}
    expanded = _PLACEHOLDER.sub(lambda match: values[match.group(1)], str(config.output_dir))
    return config.model_copy(update={"output_dir": Path(expanded)})


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(
                ".".join(keys[: depth + 1]), "is a value, not a section", f"check the --set path `{dotted}`"
            )
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`ppo.learning_rate=1e-5` -> ("ppo.learning_rate", 1e-5); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise ConfigError(text, "is not a `key.path=value` override", "write it like `ppo.learning_rate=1e-5`")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"value {raw!r} is not valid YAML ({exc.__class__.__name__})", "quote strings") from None
    return key.strip(), value


# Settings of peft or TRL that ppoflow has no use for, and why (a ported config meets this, not "unknown").
NOT_SETTINGS = {
    "peft.lora_dropout": (
        "remove it: ppoflow trains with every dropout off, LoRA's included (PPO's first ratio must be 1)"
    ),
}


def _first_error(exc: ValidationError) -> ConfigError:
    """The error to report: an unknown key before anything else (a misspelt section would otherwise be
    reported as the real one missing), with the closest known name."""
    errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    error = errors[0]
    field = ".".join(str(part) for part in error["loc"]) or "<root>"
    kind = error["type"]
    if kind == "extra_forbidden":
        if field in NOT_SETTINGS:
            return ConfigError(field, "is not a setting here", NOT_SETTINGS[field])
        known = _known_names(error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        fix = (
            f"did you mean `{close[0]}`?"
            if close
            else f"known here: {', '.join(known)}"
            if known
            else "check the spelling against configs/toy.yaml"
        )
        return ConfigError(field, "is not a known setting", fix)
    if kind == "missing":
        return ConfigError(field, "is required", "add it to the config file or pass --set")
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return ConfigError(field, f"{error['msg'].removeprefix('Value error, ')}{shown}", "fix the value")


def _known_names(loc: tuple) -> list[str]:
    """The setting names of the config section at `loc` (a pydantic error location), [] if unknown."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        candidates = [
            arg
            for arg in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(arg, type) and issubclass(arg, BaseModel)
        ]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def build_config(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a config tree with `key.path=value` overrides applied on top."""
    tree = json.loads(json.dumps(tree, default=str))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise _first_error(exc) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config file and apply overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "--config", f"file {path} does not exist", "pass the path of a YAML config such as configs/toy.yaml"
        )
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(
            "--config", f"{path} is not UTF-8 text", "pass a YAML config file such as configs/toy.yaml"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            "--config", f"{path} is not valid YAML{where}: {exc.problem or exc.context}", "fix the file"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {str(exc).splitlines()[0]}", "fix the file") from None
    if not isinstance(tree, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of sections", "see configs/toy.yaml")
    return build_config(tree, overrides)


def is_registry_uri(source: str | None) -> bool:
    """`models:/...`: a model of the MLflow Model Registry (resolved in stage 2, `ppoflow.tracking.registry`)."""
    return source is not None and source.startswith("models:/")


def names_registry_alias(models: ModelsConfig) -> bool:
    """Some model is `models:/NAME@ALIAS`: a name whose version moves between runs of one config."""
    return any(
        (match := REGISTRY_URI.fullmatch(getattr(models, field) or "")) is not None and match["alias"] is not None
        for field in MODEL_SOURCE_FIELDS
    )
