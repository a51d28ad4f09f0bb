"""Updating the model on fresh + replayed tokens with infinite LR schedules.

Depends on ``everlearn.buffers`` only.
"""

from everlearn.learners.batching import ReplayMixer, Span, TokenPacker, Windows
from everlearn.learners.checkpoints import CheckpointRef, CheckpointStore, FileEntry
from everlearn.learners.config import TrainConfig
from everlearn.learners.learner import (
    Learner,
    StepStats,
    load_weights,
    sequence_losses,
    token_losses,
)
from everlearn.learners.model import ModelConfig, Tokenizer, build_model, build_tokenizer
from everlearn.learners.replay import DomainShift, ReplaySchedule, replay_fraction
from everlearn.learners.schedules import InfiniteSchedule, ScheduleConfig, infinite_lr

__all__ = [
    "CheckpointRef", "CheckpointStore", "FileEntry", "InfiniteSchedule", "Learner", "ModelConfig",
    "DomainShift", "ReplayMixer", "ReplaySchedule", "ScheduleConfig", "Windows", "replay_fraction", "Span", "StepStats", "TokenPacker", "Tokenizer", "TrainConfig",
    "build_model", "build_tokenizer", "infinite_lr", "load_weights", "sequence_losses", "token_losses",
]
