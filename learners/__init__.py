"""Updating the model on fresh + replayed tokens with infinite LR schedules.

Depends on ``everlearn.buffers`` only. Names are imported from their modules on first use,
so reading a configuration does not load torch.
"""

from typing import TYPE_CHECKING

from everlearn.lazy import lazy_names

_WHERE = {  # name -> the module that defines it, imported when the name is first used
    "CheckpointRef": "checkpoints",
    "CheckpointStore": "checkpoints",
    "DomainShift": "replay",
    "FileEntry": "checkpoints",
    "InfiniteSchedule": "schedules",
    "Learner": "learner",
    "ModelConfig": "config",
    "ReplayMixer": "batching",
    "ReplaySchedule": "replay",
    "ScheduleConfig": "schedules",
    "Span": "batching",
    "StepStats": "learner",
    "TokenPacker": "batching",
    "Tokenizer": "model",
    "TrainConfig": "config",
    "Windows": "batching",
    "build_model": "model",
    "build_tokenizer": "model",
    "infinite_lr": "schedules",
    "LoraConfig": "config",
    "Models": "weights",
    "load_into": "weights",
    "replay_fraction": "replay",
    "sequence_losses": "learner",
    "token_losses": "learner",
}
__all__ = [
    "CheckpointRef", "CheckpointStore", "DomainShift", "FileEntry", "InfiniteSchedule", "Learner",
    "ModelConfig", "ReplayMixer", "ReplaySchedule", "ScheduleConfig", "Span", "StepStats",
    "TokenPacker", "Tokenizer", "TrainConfig", "Windows", "build_model", "build_tokenizer",
    "infinite_lr", "load_into", "LoraConfig", "Models", "replay_fraction", "sequence_losses", "token_losses",
]


__getattr__ = lazy_names(__name__, _WHERE, globals())  # PEP 562: torch / Ray Serve load on first use


if TYPE_CHECKING:  # what type checkers and editors see
    from everlearn.learners.batching import ReplayMixer, Span, TokenPacker, Windows
    from everlearn.learners.checkpoints import CheckpointRef, CheckpointStore, FileEntry
    from everlearn.learners.config import LoraConfig, ModelConfig, TrainConfig
    from everlearn.learners.learner import (
        Learner,
        StepStats,
        sequence_losses,
        token_losses,
    )
    from everlearn.learners.model import Tokenizer, build_model, build_tokenizer
    from everlearn.learners.replay import DomainShift, ReplaySchedule, replay_fraction
    from everlearn.learners.schedules import InfiniteSchedule, ScheduleConfig, infinite_lr
    from everlearn.learners.weights import Models, load_into
