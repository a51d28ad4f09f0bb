"""Bounded, seeded memories of the past stream (reservoir replay buffers).

Depends on nothing else in everlearn.
"""

from everlearn.buffers.config import BufferConfig
from everlearn.buffers.protocol import ReplayBuffer
from everlearn.buffers.reservoir import UniformReservoir
from everlearn.buffers.storage import PAD_ID, SequenceSlots

__all__ = ["PAD_ID", "BufferConfig", "ReplayBuffer", "SequenceSlots", "UniformReservoir", "build_buffer"]


def build_buffer(config: BufferConfig, seq_len: int) -> UniformReservoir:
    """The replay buffer the config asks for."""
    return UniformReservoir(capacity=config.capacity, seq_len=seq_len, seed=config.seed, dedup=config.dedup)
