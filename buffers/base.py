"""What every reservoir shares: slots, sampling, duplicate suppression, the state layout.

A buffer keeps its items in ``slots`` (preallocated arrays) at positions
``0 .. len - 1``; subclasses decide only which offered items are admitted and
which slot they replace.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from everlearn.buffers.storage import SequenceSlots, content_hash


class SlotBuffer:
    kind = "base"

    def __init__(self, capacity: int, seq_len: int, seed: int = 0, dedup: bool = False):
        self.slots = SequenceSlots(capacity, seq_len)
        self.capacity = capacity
        self.seq_len = seq_len
        self.seed = seed
        self.dedup = dedup
        self._size = 0
        self._seen = 0
        self.duplicates = 0  # offers suppressed because an identical sequence was kept
        self._kept: dict[int, int] = {}  # content hash -> slot, only with dedup
        self._offered: list[int] | None = None  # positions of the last batch that passed dedup (None: all)
        self._rng = np.random.Generator(np.random.PCG64(seed))

    # -- the ReplayBuffer protocol -------------------------------------------
    @property
    def seen(self) -> int:
        return self._seen

    def __len__(self) -> int:
        return self._size

    def sample(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        return self.sample_with_lengths(n, rng)[0]

    def sample_with_lengths(self, n: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``n`` kept sequences, uniformly over the kept slots with replacement, and their lengths."""
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = (rng or self._rng).integers(0, self._size, size=n)
        return self.slots.gather(idx)

    def items(self) -> list[np.ndarray]:
        """The kept sequences, unpadded, in slot order."""
        return self.slots.unpadded(range(self._size))

    def domain_counts(self) -> dict[str, int]:
        return self.slots.domain_counts(np.arange(self._size))

    @property
    def tokens_held(self) -> int:
        return int(self.slots.lengths[: self._size].sum())

    # -- admission helpers ---------------------------------------------------
    accepts_weights = False  # only weighted buffers take per-item weights

    def _prepare(self, items: Sequence[np.ndarray] | np.ndarray, domains: Sequence[str] | None,
                 weights: Sequence[float] | None = None) -> tuple[Sequence[np.ndarray], Sequence[str] | None, list[int] | None]:
        """Check the batch; with dedup, drop sequences already kept (or repeated in the batch).

        Returns the surviving items, their domains (None: all ``""``) and, with dedup,
        their content hashes. ``self._offered`` holds the batch positions that
        survived (None: all), for callers with per-item data of their own to align.
        Domain names become ids only for items that are stored (``_domain_ids``).
        """
        if weights is not None and not self.accepts_weights:
            raise ValueError(f"a {self.kind} buffer does not weight items; set buffer.kind to weighted to use weights")
        if domains is not None and len(domains) != len(items):
            raise ValueError(f"{len(items)} items but {len(domains)} domains")
        self.slots.check(items)
        self._offered = None  # all of them
        if not self.dedup:
            return items, domains, None
        keep, hashes, batch = [], [], set()
        for pos, seq in enumerate(items):
            h = content_hash(seq)
            if h in self._kept or h in batch:
                self.duplicates += 1
                continue
            batch.add(h)
            keep.append(pos)
            hashes.append(h)
        self._offered = keep
        if len(keep) == len(items):
            return items, domains, hashes
        kept_items = items[keep] if isinstance(items, np.ndarray) else [items[i] for i in keep]
        return kept_items, ([domains[i] for i in keep] if domains is not None else None), hashes

    def _domain_ids(self, domains: Sequence[str] | None, positions: Sequence[int]) -> list[int]:
        if domains is None:
            return [self.slots.domain_id("")] * len(positions)
        return [self.slots.domain_id(domains[j]) for j in positions]

    def _store_many(self, slots: Sequence[int], positions: Sequence[int], items, domains: Sequence[str] | None,
                    hashes: list[int] | None) -> None:
        """Store batch items ``positions`` in the distinct ``slots`` (one array assignment per field)."""
        if isinstance(items, np.ndarray):
            seqs = items[np.asarray(positions, dtype=np.intp)]
        else:
            seqs = [items[j] for j in positions]
        hs: list[int] | int = [hashes[j] for j in positions] if hashes is not None else 0
        if self.dedup:
            for slot, h in zip(slots, hs, strict=True):
                if slot < self._size:
                    self._kept.pop(int(self.slots.hashes[slot]), None)
                self._kept[h] = slot
        self.slots.put_many(slots, seqs, self._domain_ids(domains, positions), hs)

    # -- persistence ---------------------------------------------------------
    def _state(self, extra: dict[str, Any], order: np.ndarray | None = None) -> dict[str, Any]:
        idx = np.arange(self._size) if order is None else order
        arrays, slot_meta = self.slots.state(idx)
        return {
            "arrays": arrays,
            "meta": {
                "kind": self.kind, "capacity": self.capacity, "seed": self.seed, "dedup": self.dedup,
                "size": self._size, "seen": self._seen, "duplicates": self.duplicates,
                "rng": self._rng.bit_generator.state, **slot_meta, **extra,
            },
        }

    def _load(self, state: dict[str, Any]) -> dict[str, Any]:
        meta = state["meta"]
        if meta.get("kind", self.kind) != self.kind:
            raise ValueError(f"buffer state is of kind {meta['kind']!r}, this buffer is {self.kind!r}; set buffer.kind to match the run")
        self._size = self.slots.load(state["arrays"], meta)
        self._seen = int(meta["seen"])
        self.duplicates = int(meta.get("duplicates", 0))
        self._rng.bit_generator.state = meta["rng"]
        self._kept = {int(h): i for i, h in enumerate(self.slots.hashes[: self._size])} if self.dedup else {}
        return meta

