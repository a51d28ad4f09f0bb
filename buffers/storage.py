"""Preallocated storage for token sequences: no Python object per kept item.

``capacity`` slots of ``seq_len`` int32 tokens, with each slot's true length,
domain id and a 64-bit content hash (for duplicate suppression). Memory is
fixed at construction: ``capacity * (seq_len * 4 + 16)`` bytes.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

PAD_ID = 0  # pad id of the byte tokenizer; padded positions are never trained on
MAX_DOMAINS = 1024  # distinct domain names a buffer tells apart; later ones pool under OTHER_DOMAIN
OTHER_DOMAIN = "(other)"  # keeps the domain table (and its metric labels) bounded on any stream


def content_hash(seq: np.ndarray) -> int:
    """64-bit hash of a sequence's tokens (blake2b), for exact-duplicate suppression."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(seq, dtype=np.int32).tobytes(), digest_size=8).digest(), "little")


class SequenceSlots:
    def __init__(self, capacity: int, seq_len: int):
        if capacity < 1 or seq_len < 1:
            raise ValueError(f"capacity and seq_len must be >= 1, got {capacity} and {seq_len}")
        self.capacity = capacity
        self.seq_len = seq_len
        self.tokens = np.full((capacity, seq_len), PAD_ID, dtype=np.int32)
        self.lengths = np.zeros(capacity, dtype=np.int32)
        self.domain_ids = np.zeros(capacity, dtype=np.int32)
        self.hashes = np.zeros(capacity, dtype=np.uint64)
        self.domains: list[str] = []  # domain id -> name, in order of first appearance
        self._domain_index: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.lengths.nbytes + self.domain_ids.nbytes + self.hashes.nbytes

    def domain_id(self, domain: str) -> int:
        idx = self._domain_index.get(domain)
        if idx is None:
            if len(self.domains) >= MAX_DOMAINS - 1 and domain != OTHER_DOMAIN:
                return self.domain_id(OTHER_DOMAIN)  # the last entry of a full table
            idx = self._domain_index[domain] = len(self.domains)
            self.domains.append(domain)
        return idx

    def check(self, items: Sequence[np.ndarray]) -> None:
        """Refuse a batch with a sequence longer than ``seq_len`` before any of it is taken."""
        if isinstance(items, np.ndarray):  # a 2-D batch of windows: its shape says it all
            if items.ndim != 2:
                raise ValueError(f"a batch array must be 2-D (sequences x tokens), got shape {items.shape}")
            longest = items.shape[1] if len(items) else 0
        else:
            longest = max(map(len, items), default=0)  # one C-level pass: this runs for every offered item
        if longest > self.seq_len:
            raise ValueError(f"sequence of {longest} tokens exceeds seq_len={self.seq_len}; pack sequences first")

    def put_many(self, slots: Sequence[int], seqs: Sequence[np.ndarray] | np.ndarray, domain_ids: Sequence[int] | int,
                 hashes: Sequence[int] | int = 0) -> None:
        """Store ``seqs[i]`` in ``slots[i]`` with one array assignment per field; ``slots`` must be distinct."""
        if len(slots) == 0:
            return
        idx = np.asarray(slots, dtype=np.intp)
        if isinstance(seqs, np.ndarray) and seqs.shape[1] == self.seq_len:  # packed windows: no padding to do
            self.tokens[idx] = seqs
            lengths = self.seq_len
        else:
            lengths = np.fromiter(map(len, seqs), dtype=np.int32, count=len(seqs))
            if (lengths == self.seq_len).all():
                self.tokens[idx] = np.stack(seqs)
            else:
                rows = np.full((len(seqs), self.seq_len), PAD_ID, dtype=np.int32)
                for r, (seq, n) in enumerate(zip(seqs, lengths.tolist(), strict=True)):
                    rows[r, :n] = seq
                self.tokens[idx] = rows
        self.lengths[idx] = lengths
        self.domain_ids[idx] = domain_ids
        self.hashes[idx] = hashes

    def gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[idx], self.lengths[idx]

    def unpadded(self, idx) -> list[np.ndarray]:
        return [self.tokens[i, : self.lengths[i]].copy() for i in idx]

    def domain_counts(self, idx: np.ndarray) -> dict[str, int]:
        counts = np.bincount(self.domain_ids[idx], minlength=len(self.domains))
        return {name: int(c) for name, c in zip(self.domains, counts, strict=True)}

    def state(self, idx: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays of the slots ``idx`` (in that order) and the domain table."""
        idx = np.asarray(idx, dtype=np.int64)
        arrays = {
            "tokens": self.tokens[idx].copy(),
            "lengths": self.lengths[idx].copy(),
            "domain_ids": self.domain_ids[idx].copy(),
            "hashes": self.hashes[idx].copy(),
        }
        return arrays, {"domains": list(self.domains), "seq_len": self.seq_len}

    def load(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
        """Fill slots 0..n-1 from ``arrays``; returns n."""
        if meta["seq_len"] != self.seq_len:
            raise ValueError(f"buffer state has seq_len={meta['seq_len']}, this buffer {self.seq_len}")
        n = len(arrays["lengths"])
        if n > self.capacity:
            raise ValueError(f"buffer state holds {n} sequences, more than capacity={self.capacity}")
        self.tokens[:] = PAD_ID
        self.lengths[:] = 0
        self.domain_ids[:] = 0
        self.hashes[:] = 0
        self.tokens[:n] = arrays["tokens"]
        self.lengths[:n] = arrays["lengths"]
        self.domain_ids[:n] = arrays["domain_ids"]
        if "hashes" in arrays:
            self.hashes[:n] = arrays["hashes"]
        self.domains = list(meta["domains"])
        self._domain_index = {d: i for i, d in enumerate(self.domains)}
        return n
