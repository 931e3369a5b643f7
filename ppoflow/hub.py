"""Stage 6's last step: push the trained policy to the Hugging Face Hub for deployment.

`final/` is uploaded as it is (full weights, or with LoRA the adapter) with a model card naming the
MLflow run, the config hash and the data digests. The token comes from the environment only
(`HF_TOKEN`, or the file `hf auth login` writes), never from the config, and is never logged. The push
runs after the registry has the version, is retried, and a push that keeps failing fails the stage
with one line while the registered version stays.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ppoflow.config import TrackingConfig
from ppoflow.errors import ConfigError, TrackingError
from ppoflow.manifests import DatasetManifest, Release, RunPlan

log = logging.getLogger(__name__)

CARD = "README.md"


@dataclass(frozen=True)
class HubCommit:
    repo_id: str
    commit_url: str
    revision: str


def check_push(tracking: TrackingConfig) -> None:
    """Stage 1, before anything runs: a push that could never happen is refused now."""
    if not tracking.push_to_hub:
        return
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            "tracking.push_to_hub",
            "is true while HF_HUB_OFFLINE=1 forbids reaching the Hub",
            "unset HF_HUB_OFFLINE for this run, or set tracking.push_to_hub=false",
        )
    if not get_token():
        raise ConfigError(
            "tracking.push_to_hub",
            "needs a Hugging Face token with write access, and none is set",
            "export HF_TOKEN=... (or run `hf auth login`); the config never holds the token",
        )


def model_card(plan: RunPlan, data: DatasetManifest, release: Release) -> str:
    """The README.md pushed beside the weights: where the model came from, in prose and YAML front matter."""
    config = plan.config
    metrics = "\n".join(f"| `{name}` | {value:.4g} |" for name, value in sorted(release.eval_metrics.items()))
    registered = (
        f"`{release.registered_model}` version {release.registered_version}"
        if release.registered_version
        else "not registered"
    )
    library = "peft" if config.peft.enabled else "transformers"
    return f"""---
library_name: {library}
tags: [ppoflow, rlhf, ppo]
---

# {config.tracking.hub_repo_id}

A policy trained with PPO (RLHF) by [ppoflow](https://github.com/) from `{config.models.policy}`
against the reward model `{config.models.reward}`{" as a LoRA adapter" if config.peft.enabled else ""}.

## Lineage

| what | value |
|---|---|
| MLflow run | `{release.mlflow_run_id}` |
| MLflow registered model | {registered} |
| config hash | `{plan.config_hash}` |
| training prompts | `{data.source}`, {data.train_rows} rows, digest `{data.train_digest}` |
| evaluation prompts | {data.eval_rows} rows, digest `{data.eval_digest}` |
| dataset fingerprint | `{data.fingerprint}` |
| policy files (sha256 of `final/`) | `{release.policy_sha256}` |

## Evaluation on the held-out prompts (policy against the reference)

| metric | value |
|---|---|
{metrics}
"""


def push_policy(plan: RunPlan, data: DatasetManifest, release: Release) -> HubCommit:
    """Upload `release.policy_dir` with its model card (one commit) to `tracking.hub_repo_id`; retried on
    failure after each of `tracking.hub_retry_delay_seconds`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    tracking = plan.config.tracking
    repo_id = tracking.hub_repo_id
    files = sorted(path for path in release.policy_dir.rglob("*") if path.is_file())
    operations = [
        CommitOperationAdd(path_in_repo=str(path.relative_to(release.policy_dir)), path_or_fileobj=str(path))
        for path in files
        if path.relative_to(release.policy_dir) != Path(CARD)  # ours replaces peft's card
    ] + [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=model_card(plan, data, release).encode())]
    api = HfApi()
    retry_delays = tracking.hub_retry_delay_seconds
    attempts = len(retry_delays) + 1
    for attempt, delay in enumerate([*retry_delays, None], start=1):
        try:
            api.create_repo(repo_id, private=tracking.hub_private, exist_ok=True, repo_type="model")
            commit = api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=f"ppoflow: MLflow run {release.mlflow_run_id}, config {plan.config_hash}",
            )
            log.info("pushed %s to the Hub: %s", release.policy_dir, commit.commit_url)
            return HubCommit(repo_id=repo_id, commit_url=commit.commit_url, revision=commit.oid)
        except Exception as exc:  # the Hub client raises many types (HTTP, auth, network): each gets a retry
            reason = _first_line(exc)
            if delay is None:
                kept = (
                    f"version {release.registered_version} of {release.registered_model}"
                    if release.registered_version
                    else "the MLflow run"
                )
                raise TrackingError(
                    f"tracking.push_to_hub: pushing {release.policy_dir} to {repo_id} failed "
                    f"{attempts} time{'s' if attempts > 1 else ''} ({reason}) — {kept} is kept; check "
                    "the token's write access and the Hub, then run again: finished stages are reused"
                ) from None
            log.warning("Hub push attempt %d of %d failed (%s); retrying in %.0f s", attempt, attempts, reason, delay)
            time.sleep(delay)


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:300]
