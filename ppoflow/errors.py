"""Project exceptions. Each message says what was wrong, where, and what to do about it.

`PpoflowError` subclasses are *user* errors (bad config, bad data, bad model): retrying cannot fix
them, so the flow fails at once instead of retrying. Anything else is treated as transient.
"""

from __future__ import annotations


class PpoflowError(Exception):
    """Base class of every error ppoflow raises on purpose."""

    retryable = False


class ConfigError(PpoflowError):
    """A configuration value is invalid. Names the dotted field and the fix."""

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        message = f"config field `{field}`: {problem}"
        if fix:
            message += f" — {fix}"
        super().__init__(message)


class DataError(PpoflowError):
    """The prompt dataset cannot be used as given."""


class ModelError(PpoflowError):
    """A model or tokenizer cannot be loaded or does not fit its role."""


class CheckpointError(PpoflowError):
    """No usable checkpoint, or a checkpoint that does not match this run."""


class TrainingDiverged(PpoflowError):
    """A loss, reward or gradient became NaN/inf; names the update and the metric."""


class TrackingError(PpoflowError):
    """The MLflow tracking server or registry refused or cannot be reached."""
