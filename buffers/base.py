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
    def _prepare(self, items: Sequence[np.ndarray], domains: Sequence[str] | None) -> tuple[list[np.ndarray], list[int], list[int]]:
        """Check the batch; with dedup, drop sequences already kept (or repeated in the batch).

        ``self._offered`` is left holding the batch positions that survived, for callers
        with per-item data of their own (weights) to align.
        """
        if domains is not None and len(domains) != len(items):
            raise ValueError(f"{len(items)} items but {len(domains)} domains")
        self.slots.check(items)
        dom_ids = [self.slots.domain_id(d) for d in domains] if domains is not None else [self.slots.domain_id("")] * len(items)
        if not self.dedup:
            self._offered = None  # all of them
            return list(items), dom_ids, [0] * len(items)
        keep_items, keep_doms, hashes, batch, self._offered = [], [], [], set(), []
        for pos, (seq, dom) in enumerate(zip(items, dom_ids, strict=True)):
            h = content_hash(seq)
            if h in self._kept or h in batch:
                self.duplicates += 1
                continue
            batch.add(h)
            self._offered.append(pos)
            keep_items.append(seq)
            keep_doms.append(dom)
            hashes.append(h)
        return keep_items, keep_doms, hashes

    def _store(self, slot: int, seq: np.ndarray, dom: int, h: int) -> None:
        if self.dedup:
            if slot < self._size:
                self._kept.pop(int(self.slots.hashes[slot]), None)
            self._kept[h] = slot
        self.slots.put(slot, seq, dom, h)

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


class BlockUniforms:
    """Uniform draws on (0, 1], served from blocks: one numpy call per block, not per draw.

    A numpy scalar draw costs ~1-3 us here, more than the rest of an Algorithm L
    admission. The state is the generator's state *before* the current block plus
    the index into it, so a restore regenerates the block and continues exactly.
    """

    BLOCK = 4096

    def __init__(self, seed: int):
        self._gen = np.random.Generator(np.random.PCG64([seed, 0x5EED]))  # its own stream: sampling never shifts it
        self._refill()

    def _refill(self) -> None:
        self._start = self._gen.bit_generator.state
        self._block = (1.0 - self._gen.random(self.BLOCK)).tolist()  # (0, 1]: log() is always finite
        self._i = 0

    def __call__(self) -> float:
        if self._i == self.BLOCK:
            self._refill()
        u = self._block[self._i]
        self._i += 1
        return u

    def state(self) -> dict[str, Any]:
        return {"start": self._start, "i": self._i}

    def load(self, state: dict[str, Any]) -> None:
        self._gen.bit_generator.state = state["start"]
        self._refill()
        self._i = int(state["i"])
