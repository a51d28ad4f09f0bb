"""Bounded, seeded memories of the past stream (reservoir replay buffers).

Depends on nothing else in everlearn.
"""

from everlearn.buffers.config import BufferConfig
from everlearn.buffers.protocol import ReplayBuffer
from everlearn.buffers.reservoir import ReservoirBuffer

__all__ = ["BufferConfig", "ReplayBuffer", "ReservoirBuffer", "build_buffer"]


def build_buffer(config: BufferConfig, seq_len: int) -> ReservoirBuffer:
    """The replay buffer the config asks for (one kind so far: uniform reservoir)."""
    return ReservoirBuffer(capacity=config.capacity, seq_len=seq_len, seed=config.seed)
