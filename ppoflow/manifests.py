"""What each stage hands to the next: small pydantic records of paths, hashes and counts.

Heavy state (weights, tokenized data, checkpoints) stays on disk in the run workspace. A manifest
can say whether its files are still there and unchanged (`is_intact`), so a cached one whose files
were deleted or altered is recomputed, never trusted.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ppoflow.batching import BatchPlan
from ppoflow.checkpoint import verify_checkpoint
from ppoflow.config import DataWindow, RunConfig
from ppoflow.errors import CheckpointError, PpoflowError
from ppoflow.hashing import local_source_digest, sha256_file, sha256_tree


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    def is_intact(self) -> bool:
        """True when every file the manifest points to is present and unchanged."""
        return True


class RunPlan(Manifest):
    """Stage 1: the validated config, its hash, the workspace and the batch arithmetic."""

    config: RunConfig
    config_hash: str
    output_dir: Path
    batch: BatchPlan


class ModelSource(Manifest):
    role: str
    source: str
    revision: str | None
    local_dir: Path
    sha256: str
    model_class: str
    num_parameters: int
    registry_uri: str | None = None  # `models:/NAME/VERSION` a registry source resolved to (its files: local_dir)


class ModelManifest(Manifest):
    """Stage 2: the four models' provenance and the prepared tokenizer."""

    policy: ModelSource
    ref: ModelSource | None
    reward: ModelSource
    value: ModelSource
    tokenizer_dir: Path
    tokenizer_sha256: str
    pad_token_id: int
    eos_token_id: int
    stop_token_id: int | None  # TRL's meaning: EOS for `stop_token: eos`, `ppo.stop_token_id`, or None (no stop)
    # The reward model's own tokenizer (prepared like the policy's), when it differs from the policy's:
    # prompt + response are then re-encoded as text for scoring. None: it scores the policy's tokens.
    reward_tokenizer_dir: Path | None = None
    reward_tokenizer_sha256: str | None = None
    reward_chat_template: bool = False  # the reward tokenizer renders conversations with its own template

    def roles(self) -> dict[str, ModelSource | None]:
        """The four models by role; `ref` None: the policy with its LoRA adapter disabled."""
        return {"policy": self.policy, "ref": self.ref, "reward": self.reward, "value": self.value}

    @property
    def stop_token_ids(self) -> list[int]:
        """The tokens that end (and truncate) a response; empty: responses run to `response_length`."""
        return [] if self.stop_token_id is None else [self.stop_token_id]

    @property
    def completion_token_id(self) -> int:
        """A response holding this token is complete; one without it gets `missing_eos_penalty`.
        The stop token when there is one (a response then ends with it), else EOS anywhere, as TRL."""
        return self.eos_token_id if self.stop_token_id is None else self.stop_token_id

    def is_intact(self) -> bool:
        reward_intact = self.reward_tokenizer_dir is None or (
            self.reward_tokenizer_dir.is_dir()
            and sha256_tree(self.reward_tokenizer_dir) == self.reward_tokenizer_sha256
        )
        return (
            reward_intact and self.tokenizer_dir.is_dir() and sha256_tree(self.tokenizer_dir) == self.tokenizer_sha256
        )


class PartitionRecord(Manifest):
    """One partition file stage 3 read (`ppoflow.partitions`): where, its date, digest and rows."""

    path: Path
    date: datetime.date | None  # from the file name; None: undated partitions, read in name order
    sha256: str
    rows: int


class DatasetManifest(Manifest):
    """Stage 3: tokenized train/eval prompts on disk, their fingerprint and row counts."""

    train_dir: Path
    eval_dir: Path
    fingerprint: str
    source: str
    rows_read: int
    rows_kept: int
    dropped_too_long: int
    dropped_empty: int
    eos_stripped: int
    eos_dropped: int
    train_rows: int
    eval_rows: int
    train_digest: str
    eval_digest: str
    source_path: Path | None = None
    source_split: str = "train"
    source_digest: str | None = None
    source_window: DataWindow | None = None  # data.window, for a partitioned source_path (a directory or a glob)
    partitions: list[PartitionRecord] = []  # the partitions read, oldest first; empty for an unpartitioned source
    chat_template_path: Path | None = None  # the template file (data.chat_template) that rendered conversations
    chat_template_digest: str | None = None

    def is_intact(self) -> bool:
        """The prepared splits are unchanged, and so are a local source and a chat template file (an
        edited prompts file must be prepared again, not answered from yesterday's cache). For a
        partitioned source, the window selects the same partitions, each unchanged: a partition that
        landed since is read the next time."""
        source_unchanged = self.source_digest is None or (
            self.source_path is not None and self._current_source_digest() == self.source_digest
        )
        template_unchanged = self.chat_template_path is None or (
            self.chat_template_path.is_file() and sha256_file(self.chat_template_path) == self.chat_template_digest
        )
        return (
            source_unchanged
            and template_unchanged
            and self.train_dir.is_dir()
            and self.eval_dir.is_dir()
            and sha256_tree(self.train_dir) == self.train_digest
            and sha256_tree(self.eval_dir) == self.eval_digest
        )

    def _current_source_digest(self) -> str | None:
        try:
            return local_source_digest(self.source_path, self.source_split, self.source_window)
        except PpoflowError:  # the partitions are gone or can no longer be ordered: not intact
            return None


class CheckpointManifest(Manifest):
    """Stages 4 and 5: a complete checkpoint and where training stands."""

    path: Path
    update: int
    episode: int
    num_updates: int
    sha256: str

    def is_intact(self) -> bool:
        try:
            return verify_checkpoint(self.path) == self.sha256
        except CheckpointError:
            return False


class Release(Manifest):
    """Stage 6: the trained policy on disk, its evaluation, and where tracking put it."""

    policy_dir: Path
    policy_sha256: str
    eval_path: Path
    eval_metrics: dict[str, float]
    merged_dir: Path | None = None
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    registered_model: str | None = None
    registered_version: str | None = None
    hub_commit_url: str | None = None
    promotion: dict[str, Any] | None = None  # the promotion gate's decision (`ppoflow.tracking.promotion`)

    def is_intact(self) -> bool:
        return self.policy_dir.is_dir() and sha256_tree(self.policy_dir) == self.policy_sha256


def training_fingerprint(models: ModelManifest, data_fingerprint: str) -> str:
    """What a training starts from besides its config: the four models' and the tokenizers' hashes
    and the prepared data's fingerprint (`DatasetManifest.fingerprint`). Under one config hash it
    tells a workspace's training from the next one: a new partition in the data window, or a registry
    alias that moved to another version. Checkpoints record it (stages 4 and 5 continue only the same
    training), stage 3 archives a workspace's training of another one, and each one is its own MLflow
    run."""
    parts = [
        f"{source.role}={source.sha256}"
        for source in (models.policy, models.ref, models.reward, models.value)
        if source is not None
    ]
    parts += [
        f"tokenizer={models.tokenizer_sha256}",
        f"reward_tokenizer={models.reward_tokenizer_sha256}",
        f"data={data_fingerprint}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
