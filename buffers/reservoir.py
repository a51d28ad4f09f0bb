"""Uniform reservoir of fixed-length token sequences in preallocated arrays.

Algorithm R (Vitter 1985): item number ``t`` (0-based) of the stream is kept
with probability ``k / (t + 1)``, replacing a uniformly chosen slot, so after
``n`` items every one of them is in the reservoir with probability ``k / n``.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

PAD_ID = 0  # pad id of the byte tokenizer; padded positions are never trained on


class ReservoirBuffer:
    """Uniform, seeded reservoir of token sequences (``capacity`` x ``seq_len`` int32).

    Sequences shorter than ``seq_len`` are padded with ``PAD_ID`` and their true
    length kept in ``lengths``; longer ones are refused (callers pack first).
    """

    def __init__(self, capacity: int, seq_len: int, seed: int = 0):
        if capacity < 1 or seq_len < 1:
            raise ValueError(f"capacity and seq_len must be >= 1, got {capacity} and {seq_len}")
        self.capacity = capacity
        self.seq_len = seq_len
        self.seed = seed
        self.tokens = np.full((capacity, seq_len), PAD_ID, dtype=np.int32)
        self.lengths = np.zeros(capacity, dtype=np.int32)
        self.domain_ids = np.zeros(capacity, dtype=np.int32)
        self.domains: list[str] = []  # domain id -> name, in order of first appearance
        self._size = 0
        self._seen = 0
        self._rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def seen(self) -> int:
        return self._seen

    def __len__(self) -> int:
        return self._size

    def _domain_id(self, domain: str) -> int:
        try:
            return self.domains.index(domain)
        except ValueError:
            self.domains.append(domain)
            return len(self.domains) - 1

    def _put(self, slot: int, seq: np.ndarray, domain: str) -> None:
        n = len(seq)
        self.tokens[slot, :n] = seq
        self.tokens[slot, n:] = PAD_ID
        self.lengths[slot] = n
        self.domain_ids[slot] = self._domain_id(domain)

    def add_many(self, items: Sequence[np.ndarray], domains: Sequence[str] | None = None) -> None:
        if domains is not None and len(domains) != len(items):
            raise ValueError(f"{len(items)} items but {len(domains)} domains")
        for i, seq in enumerate(items):
            if len(seq) > self.seq_len:
                raise ValueError(f"sequence of {len(seq)} tokens exceeds seq_len={self.seq_len}")
            domain = domains[i] if domains is not None else ""
            t = self._seen
            self._seen += 1
            if self._size < self.capacity:
                self._put(self._size, seq, domain)
                self._size += 1
                continue
            j = int(self._rng.integers(0, t + 1))  # keep with probability k / (t + 1)
            if j < self.capacity:
                self._put(j, seq, domain)

    def sample(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``n`` kept sequences, uniformly with replacement, as an ``(n, seq_len)`` array."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = (rng or self._rng).integers(0, self._size, size=n)
        return self.tokens[idx].copy()

    def sample_with_lengths(self, n: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = (rng or self._rng).integers(0, self._size, size=n)
        return self.tokens[idx].copy(), self.lengths[idx].copy()

    def items(self) -> list[np.ndarray]:
        """The kept sequences, unpadded, in slot order."""
        return [self.tokens[i, : self.lengths[i]].copy() for i in range(self._size)]

    def domain_counts(self) -> dict[str, int]:
        counts = np.bincount(self.domain_ids[: self._size], minlength=len(self.domains))
        return {name: int(c) for name, c in zip(self.domains, counts, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """Arrays under ``arrays`` (for safetensors), the rest JSON-serialisable under ``meta``."""
        return {
            "arrays": {
                "tokens": self.tokens[: self._size].copy(),
                "lengths": self.lengths[: self._size].copy(),
                "domain_ids": self.domain_ids[: self._size].copy(),
            },
            "meta": {
                "kind": "uniform",
                "capacity": self.capacity,
                "seq_len": self.seq_len,
                "seed": self.seed,
                "size": self._size,
                "seen": self._seen,
                "domains": list(self.domains),
                "rng": self._rng.bit_generator.state,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta, arrays = state["meta"], state["arrays"]
        if meta["seq_len"] != self.seq_len:
            raise ValueError(f"buffer state has seq_len={meta['seq_len']}, this buffer {self.seq_len}")
        size = int(meta["size"])
        if size > self.capacity:
            raise ValueError(f"buffer state holds {size} sequences, more than capacity={self.capacity}")
        self.tokens[:] = PAD_ID
        self.lengths[:] = 0
        self.domain_ids[:] = 0
        self.tokens[:size] = arrays["tokens"]
        self.lengths[:size] = arrays["lengths"]
        self.domain_ids[:size] = arrays["domain_ids"]
        self.domains = list(meta["domains"])
        self._size = size
        self._seen = int(meta["seen"])
        self._rng.bit_generator.state = meta["rng"]
