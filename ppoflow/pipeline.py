"""The six stages of a run, as plain functions over manifests.

`ppoflow train` calls them in order in one process (or in each process under `accelerate
launch`); the Prefect flow wraps each in a task. Every stage is idempotent on the run workspace:
run again, it reuses what a previous attempt finished (the step-0 checkpoint, the newest training
checkpoint) instead of redoing or overwriting it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from ppoflow.atomic import write_text_atomic
from ppoflow.batching import BatchPlan
from ppoflow.checkpoint import (
    list_checkpoints,
    newest_state,
    newest_valid_checkpoint,
    read_state,
    storage_problem,
    verify_checkpoint,
)
from ppoflow.config import (
    ModelsConfig,
    RunConfig,
    build_config,
    config_differences,
    expand_output_dir,
    is_registry_uri,
    output_dir_placeholders,
)
from ppoflow.console import run_stage
from ppoflow.data import prepare_prompts
from ppoflow.errors import ConfigError, ModelError, PpoflowError
from ppoflow.evaluate import evaluate_policy, save_policy, write_eval
from ppoflow.hashing import sha256_tree
from ppoflow.locking import output_dir_lock
from ppoflow.manifests import CheckpointManifest, DatasetManifest, ModelManifest, Release, RunPlan, training_fingerprint
from ppoflow.models import load_policy, load_released
from ppoflow.preflight import validate_sources
from ppoflow.rewards import load_reward_functions
from ppoflow.runtime import (
    check_launched_plain,
    check_mixed_precision,
    check_sharding_plan,
    configure_torch,
    machine_count,
    process_state,
    read_accelerate_config,
    sharding,
)
from ppoflow.sources import REGISTRY_FIELDS, describe_models, pin_registry_sources, restore_registry_sources
from ppoflow.tokenizers import load_tokenizer, prepare_tokenizers, settle_value_source
from ppoflow.trainer import MetricsCallback, PPOTrainer
from ppoflow.workspace import EVAL_FILE, HEAD_TO_HEAD_FILE, METRICS_FILE, SAMPLES_FILE, SPOOL_FILE, check_resume

log = logging.getLogger(__name__)


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            "output_dir", f"{output_dir} is not writable ({exc.strerror})", "choose a directory you can write to"
        ) from None


def _clear_storage_errors(stage):
    """A full, read-only or forbidden output_dir fails a stage with one clear error, not a library's
    traceback; what was written before stays (checkpoints are atomic, so the next run resumes)."""

    @functools.wraps(stage)
    def run(plan: RunPlan, *args, **kwargs):
        try:
            return stage(plan, *args, **kwargs)
        except PpoflowError:
            raise
        except Exception as exc:
            problem = storage_problem(plan.output_dir, exc)
            if problem is None:
                raise
            raise ConfigError(
                "output_dir",
                f"cannot write to {plan.output_dir}: {problem}",
                "free space or make it writable (or choose another output_dir), then run again: finished work is kept "
                "and training resumes from the newest intact checkpoint",
            ) from exc

    return run


def planned_world_size(num_processes: int, num_machines: int = 1) -> int:
    """The processes the run trains on: `runtime.num_processes` from one process (the flow launches
    them, stages 4 and 5, over `num_machines`), else the processes accelerate launched, which it must
    then agree with."""
    import torch

    running = process_state().num_processes
    if running > 1 and num_processes not in (1, running):
        raise ConfigError(
            "runtime.num_processes",
            f"is {num_processes} but accelerate launched {running} processes",
            f"set it to {running}, or launch with --num_processes {num_processes}",
        )
    wanted = max(running, num_processes)
    here = wanted // num_machines if running == 1 else int(os.environ.get("LOCAL_WORLD_SIZE", wanted))
    if torch.cuda.is_available() and here > torch.cuda.device_count():
        raise ConfigError(
            "runtime.num_processes",
            f"asks for {here} processes on this machine and it has {torch.cuda.device_count()} GPU(s)",
            f"use at most {torch.cuda.device_count()} a machine (one process per GPU)",
        )
    return wanted


def configure(config: RunConfig, world_size: int | None = None) -> RunPlan:
    """Stage 1: validate everything cheap to check, derive the batch plan, claim the workspace."""
    if output_dir_placeholders(config.output_dir):
        raise ConfigError(
            "output_dir",
            f"{config.output_dir} still holds placeholders",
            "expand them first (ppoflow.config.expand_output_dir)",
        )
    validate_sources(config)
    check_mixed_precision()
    check_launched_plain()
    settings = read_accelerate_config(config.runtime)
    sharding_plan = check_sharding_plan(config.runtime, lora=config.peft.enabled, ppo=config.ppo, settings=settings)
    machines = machine_count(settings)
    load_reward_functions(config.reward_functions)
    batch = BatchPlan.derive(config.ppo, world_size or planned_world_size(config.runtime.num_processes, machines))
    output_dir = config.output_dir.expanduser().resolve()
    config_hash = config.config_hash()
    state = newest_state(output_dir / "checkpoints")
    if state is not None:
        check_resume(
            output_dir,
            state,
            config_hash=config_hash,
            differences=_what_differs(output_dir, config, state.get("config_hash")),
            world_size=batch.world_size,
            sharding=sharding_plan.recorded,
        )
    if process_state().is_main_process:
        _check_writable(output_dir)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return RunPlan(config=config, config_hash=config_hash, output_dir=output_dir, batch=batch)


def _what_differs(output_dir: Path, config: RunConfig, config_hash: str | None) -> str:
    """`, differs in ppo.learning_rate: 5e-05 -> 1e-05`, from the workspace's config.yaml when it is the
    config of its checkpoints (of hash `config_hash`) and not `config`; empty when that cannot be told."""
    if config_hash == config.config_hash():
        return ""
    try:
        before = build_config(yaml.safe_load((output_dir / "config.yaml").read_text()))
    except Exception:  # missing, unreadable, or of a schema this version no longer accepts
        return ""
    if before.config_hash() != config_hash:
        return ""
    return ", differs in " + "; ".join(config_differences(before.identity(), config.identity()))


@_clear_storage_errors
def load_models(plan: RunPlan) -> ModelManifest:
    """Stage 2: fingerprint the four models, check their roles, and prepare the shared tokenizer."""
    models_config, pinned = _pinned_models(plan)
    config = plan.config.model_copy(update={"models": models_config})
    sources = describe_models(config.models, config.peft)
    tokenizer_dir, reward_tokenizer_dir = plan.output_dir / "tokenizer", plan.output_dir / "reward_tokenizer"
    if process_state().is_main_process:
        shutil.rmtree(reward_tokenizer_dir, ignore_errors=True)
        tokenizer, _ = prepare_tokenizers(config, sources, tokenizer_dir, reward_tokenizer_dir)
    process_state().wait_for_everyone()
    if not process_state().is_main_process:
        tokenizer = load_tokenizer(tokenizer_dir)
    reward_has_own_tokenizer = reward_tokenizer_dir.is_dir()
    sources["value"] = settle_value_source(
        config, sources, tokenizer, reward_has_own_tokenizer=reward_has_own_tokenizer
    )
    vocab_size = AutoConfig.from_pretrained(sources["policy"].local_dir).vocab_size
    stop_token_id = tokenizer.eos_token_id if config.ppo.stop_token == "eos" else config.ppo.stop_token_id
    if stop_token_id is not None and stop_token_id >= vocab_size:
        raise ConfigError(
            "ppo.stop_token_id",
            f"{stop_token_id} is outside the vocabulary of {vocab_size} tokens",
            "use a token id of the tokenizer",
        )
    if config.peft.enabled:
        _check_lora_targets(sources["policy"].local_dir, config)
    sources = restore_registry_sources(sources, pinned)
    return ModelManifest(
        policy=sources["policy"],
        ref=sources["ref"],
        reward=sources["reward"],
        value=sources["value"],
        tokenizer_dir=tokenizer_dir,
        tokenizer_sha256=sha256_tree(tokenizer_dir),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_token_id=stop_token_id,
        reward_tokenizer_dir=reward_tokenizer_dir if reward_has_own_tokenizer else None,
        reward_tokenizer_sha256=sha256_tree(reward_tokenizer_dir) if reward_has_own_tokenizer else None,
        reward_chat_template=reward_has_own_tokenizer
        and load_tokenizer(reward_tokenizer_dir).chat_template is not None,
    )


def _pinned_models(plan: RunPlan) -> tuple[ModelsConfig, dict[Path, tuple[str, str]]]:
    """Registry URIs become the versions they name now, fetched into the workspace by the main
    process; the others read its record, so every rank trains the same version even if an alias
    moves meanwhile. From here on every model is a local directory."""
    if not any(is_registry_uri(getattr(plan.config.models, field)) for field in REGISTRY_FIELDS):
        return plan.config.models, {}
    record = plan.output_dir / "registry" / "pinned.json"
    if process_state().is_main_process:
        models_config, pinned = pin_registry_sources(plan.config.models, record.parent)
        listed = [[str(path), *uris] for path, uris in pinned.items()]
        write_text_atomic(
            record, json.dumps({"models": models_config.model_dump(mode="json"), "pinned": listed}, indent=1)
        )
    process_state().wait_for_everyone()
    saved = json.loads(record.read_text())
    return ModelsConfig.model_validate(saved["models"]), {
        Path(path): (configured, resolved) for path, configured, resolved in saved["pinned"]
    }


def _check_lora_targets(policy_dir: Path, config: RunConfig) -> None:
    """Build the policy on the meta device (no memory, no weights) and try wrapping it."""
    from ppoflow.models import add_lora

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy_dir))
    add_lora(skeleton, config.peft)


@_clear_storage_errors
def prepare_dataset(plan: RunPlan, models: ModelManifest) -> DatasetManifest:
    """Stage 3: tokenize, filter and split the prompts once, on the main process. A workspace whose
    checkpoints are of another training (last night's partitions, or a policy version the alias has
    since moved from) has that training moved to `archive/` first, so stages 4-6 start this one."""
    out_dir = plan.output_dir / "data"
    if process_state().is_main_process:

        def archive_other_trainings(fingerprint: str) -> None:
            # Before the workspace's prepared data is replaced: the archived training keeps its own.
            training = training_fingerprint(models, fingerprint)
            if _trained_fingerprints(plan.output_dir) - {training}:
                archive_training(plan.output_dir)
                prune_archives(plan.output_dir, plan.config.runtime.keep_archives)

        manifest = prepare_prompts(
            plan.config.data,
            load_tokenizer(models.tokenizer_dir),
            out_dir,
            seed=plan.config.ppo.seed,
            check_fingerprint=archive_other_trainings,
        )
    process_state().wait_for_everyone()
    if not process_state().is_main_process:
        manifest = DatasetManifest.model_validate_json((out_dir / "dataset.json").read_text())
    if manifest.train_rows < plan.batch.batch_size:
        log.warning(
            "only %d training prompts for rollout batches of %d: prompts repeat within a batch",
            manifest.train_rows,
            plan.batch.batch_size,
        )
    return manifest


@_clear_storage_errors
def init_trainer(plan: RunPlan, models: ModelManifest, data: DatasetManifest) -> CheckpointManifest:
    """Stage 4: the step-0 checkpoint (policy, value from the reward model, fresh optimizer).
    An intact one from an earlier attempt is reused."""
    step_zero = plan.output_dir / "checkpoints" / "step-000000"
    if step_zero.is_dir():
        try:
            digest = verify_checkpoint(step_zero)
            state = read_state(step_zero)
        except Exception as exc:  # a damaged step-0 is rewritten below
            log.warning("rewriting the initial checkpoint: %s", exc)
        else:
            if state.get("config_hash") == plan.config_hash:
                check_resume(
                    plan.output_dir,
                    state,
                    config_hash=plan.config_hash,
                    training=training_fingerprint(models, data.fingerprint),
                )
                return CheckpointManifest(
                    path=step_zero, update=0, episode=0, num_updates=plan.batch.num_updates, sha256=digest
                )
    trainer = PPOTrainer.from_checkpoint(plan, models, data, checkpoint=None)
    return trainer.save_checkpoint()


@_clear_storage_errors
def train(
    plan: RunPlan, models: ModelManifest, data: DatasetManifest, callbacks: Sequence[MetricsCallback] = ()
) -> CheckpointManifest:
    """Stage 5: train from the newest intact checkpoint to the last update."""
    found = newest_valid_checkpoint(plan.output_dir / "checkpoints")
    if found is None:
        raise ModelError(
            f"no intact checkpoint in {plan.output_dir / 'checkpoints'} — run stage 4 (init_trainer) first"
        )
    path, digest = found
    state = read_state(path)
    check_resume(
        plan.output_dir,
        state,
        config_hash=plan.config_hash,
        world_size=plan.batch.world_size,
        training=training_fingerprint(models, data.fingerprint),
        sharding=sharding(plan.config.runtime).recorded,
    )
    if state["update"] >= plan.batch.num_updates:
        log.info(
            "training finished earlier (%s, update %d of %d): reusing it",
            path.name,
            state["update"],
            plan.batch.num_updates,
        )
        return CheckpointManifest(
            path=path,
            update=state["update"],
            episode=state["episode"],
            num_updates=plan.batch.num_updates,
            sha256=digest,
        )
    if state["update"] > 0:
        log.info("resuming from %s (update %d of %d)", path.name, state["update"], plan.batch.num_updates)
    trainer = PPOTrainer.from_checkpoint(plan, models, data, checkpoint=path)
    return trainer.train(callbacks)


TRAINING_PRODUCTS = (
    "checkpoints",
    "data",
    METRICS_FILE,
    SPOOL_FILE,
    "launch",
    "final",
    "final-merged",
    EVAL_FILE,
    SAMPLES_FILE,
    HEAD_TO_HEAD_FILE,
)
"""What stages 3-6 write into the workspace (`archive_training` moves them). Stage 1's and 2's products
(config.yaml, the tokenizers, registry fetches) stay: the next training of the config uses them."""


def archive_training(output_dir: Path) -> Path:
    """Move the workspace's training (`TRAINING_PRODUCTS`: checkpoints, prepared data, metrics and the
    MLflow spool, final policy, eval) into `archive/<UTC time>-<training fingerprint>/`, whole and
    unchanged: nothing a training wrote is deleted. Renames within one filesystem: quick."""
    trained = sorted(_trained_fingerprints(output_dir))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = output_dir / "archive" / f"{stamp}-{(trained[-1] if trained else 'unknown')[:16]}"
    target.mkdir(parents=True)
    for name in TRAINING_PRODUCTS:
        if (output_dir / name).exists():
            (output_dir / name).rename(target / name)
    log.warning(
        "%s held another training (other data or models under the same config): moved it to %s", output_dir, target
    )
    return target


def prune_archives(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the `keep` newest archived trainings (`runtime.keep_archives`; None keeps all).
    Their names start with the UTC time they were archived, so they sort oldest first. Returns the
    deleted directories."""
    root = output_dir / "archive"
    if keep is None or not root.is_dir():
        return []
    archives = sorted(path for path in root.iterdir() if path.is_dir())
    doomed = archives[: max(len(archives) - keep, 0)]
    for path in doomed:
        shutil.rmtree(path)
        log.info("deleted the archived training %s (runtime.keep_archives: %d)", path, keep)
    return doomed


def _trained_fingerprints(output_dir: Path) -> set[str]:
    """The training fingerprints the workspace's checkpoints record (their state files only, unverified:
    cheap, and any of them of another training makes the workspace another training's)."""
    found = set()
    for path in list_checkpoints(output_dir / "checkpoints"):
        try:
            found.add(read_state(path)["training_fingerprint"])
        except (OSError, ValueError, KeyError):  # damaged or older than the field: stages 4 and 5 judge it
            continue
    return found


@_clear_storage_errors
def save_and_evaluate(
    plan: RunPlan, models: ModelManifest, data: DatasetManifest, final: CheckpointManifest
) -> Release:
    """Stage 6: the trained policy in Hugging Face format, and its evaluation against the reference."""
    config = plan.config
    policy_dir = plan.output_dir / "final"
    state = process_state()
    configure_torch(config.runtime)
    if state.is_main_process:
        policy = load_policy(config, models, final.path, trainable=False, device=state.device)
        metrics, samples = evaluate_policy(config, models, data.eval_dir, policy, state.device)
        write_eval(plan.output_dir, metrics, samples)
        # merging LoRA mutates: last
        save_policy(config, policy, load_tokenizer(models.tokenizer_dir), models, policy_dir)
    state.wait_for_everyone()
    eval_path = plan.output_dir / EVAL_FILE
    merged = policy_dir.with_name("final-merged")
    return Release(
        policy_dir=policy_dir,
        policy_sha256=sha256_tree(policy_dir),
        eval_path=eval_path,
        eval_metrics={
            key: value for key, value in json.loads(eval_path.read_text()).items() if isinstance(value, (int, float))
        },
        merged_dir=merged if merged.is_dir() else None,
    )


def evaluate_against(
    plan: RunPlan, models: ModelManifest, data: DatasetManifest, policy_dir: Path, baseline_dir: Path
) -> dict[str, float]:
    """The released policy (`policy_dir`, a full Hugging Face directory) head to head with another one
    (`baseline_dir`: the promotion alias's holder) on the eval prompts, as stage 6 compares it with
    the reference: `win_rate` and `reward_ref` are against the baseline, `kl` against the reference.
    The sample table (`ref_completion` is the baseline's) goes to `HEAD_TO_HEAD_FILE`."""
    config = plan.config
    state = process_state()
    configure_torch(config.runtime)
    if AutoConfig.from_pretrained(baseline_dir).vocab_size != AutoConfig.from_pretrained(policy_dir).vocab_size:
        raise ModelError(
            f"{baseline_dir} has another vocabulary than the trained policy: the two cannot be compared head to head"
        )
    policy = load_released(config, policy_dir, state.device)
    baseline = load_released(config, baseline_dir, state.device)
    metrics, samples = evaluate_policy(config, models, data.eval_dir, policy, state.device, baseline=baseline)
    rows = "".join(json.dumps({**row, "baseline": str(baseline_dir)}) + "\n" for row in samples)
    write_text_atomic(plan.output_dir / HEAD_TO_HEAD_FILE, rows)  # the reviewer's side-by-side answers
    return metrics


def run_all(config: RunConfig, callbacks: Sequence[MetricsCallback] = ()) -> tuple[RunPlan, Release]:
    """The six stages in one process: what `ppoflow train` does. The main process holds the output
    directory's lock throughout (`ppoflow.locking`): a second run of it waits, then reuses the work.
    There is no flow run: `{date}` in output_dir is today's UTC day, `{flow_run}` is refused."""
    config = expand_output_dir(config, scheduled_start=datetime.now(timezone.utc), flow_run=None).with_absolute_paths()
    main = process_state(config.runtime).is_main_process
    with output_dir_lock(config.output_dir, config.flow.lock_timeout_seconds) if main else nullcontext():
        plan = run_stage("configure", configure, config)
        if plan.batch.world_size != process_state().num_processes:
            raise ConfigError(
                "runtime.num_processes",
                f"is {plan.batch.world_size} and `ppoflow train` is one process",
                f"start it with `accelerate launch --num_processes {plan.batch.world_size} -m ppoflow.cli train`, "
                "or use `ppoflow run`",
            )
        models = run_stage("load_models", load_models, plan)
        data = run_stage("prepare_dataset", prepare_dataset, plan, models)
        run_stage("init_trainer", init_trainer, plan, models, data)
        final = run_stage("train_ppo", train, plan, models, data, callbacks)
        return plan, run_stage("save_and_evaluate", save_and_evaluate, plan, models, data, final)
