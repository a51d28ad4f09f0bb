"""Every error everlearn raises on purpose. Messages say what was wrong and how to fix it.

    EverlearnError
    ├── ConfigError              config file, environment override or flag is invalid
    ├── ModelLoadError           model or tokenizer cannot be built or loaded
    ├── SourceError              a stream source cannot be read (bad URL, unreadable)
    │   └── SourceUnavailable        transient: storage or broker unreachable; retried with backoff
    ├── CheckpointError          checkpoint missing or incomplete
    │   ├── CheckpointCorruptError   a file's sha256 or size differs from the manifest
    │   └── StorageUnavailable       transient: the checkpoint store did not answer; retried
    ├── RunLockedError           another daemon holds this run's lease
    ├── NonFiniteError           a loss, gradient or weight is NaN or infinite
    ├── StageFailed              a stage cannot go on (its actor died, a streak of NaN steps);
    │                            the supervisor restores the run from its newest verified checkpoint
    └── ServingError             the serving deployment cannot start or swap

This module depends on nothing, so every layer may raise these.
"""


class EverlearnError(Exception):
    """Base of every error everlearn raises on purpose."""


class ConfigError(EverlearnError):
    """The configuration is invalid; the message lists every problem with its field path."""


class ModelLoadError(EverlearnError):
    """The model or tokenizer could not be built or loaded from the config."""


class SourceError(EverlearnError):
    """A stream source cannot be read."""


class SourceUnavailable(SourceError):
    """The source's storage or broker did not answer (timeout, connection reset, 5xx); retry later.

    Raised before the position moves: nothing that was not read is ever skipped.
    """


class CheckpointError(EverlearnError):
    """A checkpoint is missing, incomplete or unreadable."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file's sha256 or size differs from its manifest; it is never loaded."""


class StorageUnavailable(CheckpointError):
    """The checkpoint store did not answer (timeout, connection reset, 5xx); retry later."""


class RunLockedError(EverlearnError):
    """Another daemon holds the lease on this run (its run_dir or checkpoint store)."""


class NonFiniteError(EverlearnError):
    """A loss, gradient or weight is NaN or infinite."""


class StageFailed(EverlearnError):
    """A stage cannot go on by itself; the supervisor restarts it from the newest verified checkpoint."""

    def __init__(self, stage: str, reason: str, actor_died: bool = False):
        super().__init__(f"{stage} stage failed: {reason}")
        self.stage, self.reason, self.actor_died = stage, reason, actor_died


class ServingError(EverlearnError):
    """The serving deployment could not start, answer or swap versions."""
