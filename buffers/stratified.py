"""Per-domain stratified reservoir: a quota of the capacity per domain, each stratum uniform.

Quotas are shares of the capacity among the domains seen so far, equal or by
configured weight (a domain not named weighs 1). When a new domain first
appears, quotas are recomputed and strata above their new quota drop uniformly
chosen members: a uniform sample thinned at random stays a uniform sample, so a
late domain gets its share at once and every stratum stays uniform over its own
domain's stream (Algorithm R within the stratum, with its quota as ``k``).
Kept items stay packed in slots ``0 .. len - 1`` (an eviction moves the last slot
into the hole).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from everlearn.buffers.base import SlotBuffer


class StratifiedReservoir(SlotBuffer):
    kind = "stratified"

    def __init__(self, capacity: int, seq_len: int, seed: int = 0, dedup: bool = False,
                 domain_weights: dict[str, float] | None = None):
        super().__init__(capacity, seq_len, seed, dedup)
        if any(w <= 0 for w in (domain_weights or {}).values()):
            raise ValueError("domain weights must be > 0")
        self.domain_weights = dict(domain_weights or {})
        self.seen_by_domain: list[int] = []  # per domain id
        self.quotas: list[int] = []  # per domain id

    def _counts(self) -> np.ndarray:
        return np.bincount(self.slots.domain_ids[: self._size], minlength=len(self.slots.domains))

    def _requota(self) -> None:
        names = self.slots.domains
        w = np.array([self.domain_weights.get(d, 1.0) for d in names])
        exact = self.capacity * w / w.sum()
        quotas = np.floor(exact).astype(int)
        # largest remainders take the slots floor() left over (ties: the domain seen first)
        for d in np.argsort(-(exact - quotas), kind="stable")[: self.capacity - int(quotas.sum())]:
            quotas[d] += 1
        self.quotas = quotas.tolist()
        counts = self._counts()
        for d, (have, quota) in enumerate(zip(counts, self.quotas, strict=True)):
            for _ in range(int(have) - quota):
                self._evict(self._random_member(d))

    def _random_member(self, d: int) -> int:
        members = np.flatnonzero(self.slots.domain_ids[: self._size] == d)
        return int(members[self._rng.integers(0, len(members))])

    def _evict(self, slot: int) -> None:
        last = self._size - 1
        if self.dedup:
            self._kept.pop(int(self.slots.hashes[slot]), None)
        if slot != last:
            seq = self.slots.tokens[last, : self.slots.lengths[last]].copy()
            h = int(self.slots.hashes[last])
            self.slots.put(slot, seq, int(self.slots.domain_ids[last]), h)
            if self.dedup:
                self._kept[h] = slot
        self._size -= 1

    def add_many(self, items: Sequence[np.ndarray] | np.ndarray, domains: Sequence[str] | None = None,
                 weights: Sequence[float] | None = None) -> None:
        items, domains, hashes = self._prepare(items, domains, weights)
        doms = self._domain_ids(domains, range(len(items)))  # every offer counts toward its domain
        if hashes is None:
            hashes = [0] * len(items)
        if len(self.seen_by_domain) < len(self.slots.domains):  # new domains: their share now
            self.seen_by_domain += [0] * (len(self.slots.domains) - len(self.seen_by_domain))
            self._requota()
        counts = self._counts()
        for seq, d, h in zip(items, doms, hashes, strict=True):
            self.seen_by_domain[d] += 1
            quota = self.quotas[d]
            if counts[d] < quota:
                self._store(self._size, seq, d, h)
                self._size += 1
                counts[d] += 1
            elif quota > 0 and int(self._rng.integers(0, self.seen_by_domain[d])) < quota:
                self._store(self._random_member(d), seq, d, h)
        self._seen += len(items)

    def state_dict(self) -> dict[str, Any]:
        return self._state({"seen_by_domain": self.seen_by_domain, "quotas": self.quotas, "domain_weights": self.domain_weights})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = self._load(state)
        self.seen_by_domain = [int(x) for x in meta["seen_by_domain"]]
        self.quotas = [int(x) for x in meta["quotas"]]
