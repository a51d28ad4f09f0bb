"""Bounded, seeded memories of the past stream (reservoir replay buffers).

Depends on nothing else in everlearn.
"""

from everlearn.buffers.config import BufferConfig
from everlearn.buffers.protocol import ReplayBuffer
from everlearn.buffers.reservoir import UniformReservoir
from everlearn.buffers.storage import PAD_ID, SequenceSlots
from everlearn.buffers.stratified import StratifiedReservoir
from everlearn.buffers.weighted import WeightedReservoir

__all__ = ["PAD_ID", "BufferConfig", "ReplayBuffer", "SequenceSlots", "StratifiedReservoir", "UniformReservoir", "WeightedReservoir", "build_buffer"]


def build_buffer(config: BufferConfig, seq_len: int) -> ReplayBuffer:
    """The replay buffer the config asks for."""
    capacity = config.sequences(seq_len)
    if config.kind == "stratified":
        return StratifiedReservoir(capacity, seq_len, config.seed, config.dedup, domain_weights=config.domain_weights)
    if config.kind == "weighted":
        return WeightedReservoir(capacity, seq_len, config.seed, config.dedup, domain_weights=config.domain_weights)
    return UniformReservoir(capacity=capacity, seq_len=seq_len, seed=config.seed, dedup=config.dedup)
