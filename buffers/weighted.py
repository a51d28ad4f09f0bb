"""Weighted reservoir: Efraimidis & Spirakis' A-ExpJ ("Weighted random sampling with a
reservoir", 2006), with exponential jumps.

Item ``i`` with weight ``w_i > 0`` draws the key ``u_i ** (1 / w_i)``; the reservoir
keeps the k largest keys, which is exactly a weighted sample without
replacement (successive sampling proportional to weight). Keys are kept as logs,
``log(u) / w``, so tiny weights do not underflow. Instead of a key per item,
A-ExpJ draws how much *weight* to skip: with ``T`` the smallest kept key,

    X = log(u) / log(T)                       weight to pass over before the next admission
    admitted item i:  t = T ** w_i,  key = uniform(t, 1) ** (1 / w_i)   (it beats T)

so the random draws per item fall as the stream grows, as in Algorithm L.
"""

import bisect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from everlearn.buffers.base import SlotBuffer


class WeightedReservoir(SlotBuffer):
    kind = "weighted"

    def __init__(self, capacity: int, seq_len: int, seed: int = 0, dedup: bool = False,
                 domain_weights: dict[str, float] | None = None, default_weight: float = 1.0):
        super().__init__(capacity, seq_len, seed, dedup)
        if default_weight <= 0 or any(w <= 0 for w in (domain_weights or {}).values()):
            raise ValueError("weights must be > 0")
        self.domain_weights = dict(domain_weights or {})
        self.default_weight = default_weight
        self.log_keys = np.zeros(capacity, dtype=np.float64)  # log(u) / w of each kept item (<= 0)
        self._x = 0.0  # weight still to skip before the next admission
        # the m smallest keys, ascending, and their slots: every other key is >= the last of them, so the
        # head is always the global minimum. A cache derived from log_keys, rebuilt when it runs out.
        self._low_keys: list[float] = []
        self._low_slots: list[int] = []

    def _low_refill(self) -> None:
        keys = self.log_keys[: self._size]
        m = min(self._size, max(16, math.isqrt(self._size)))  # refills cost O(k): one per ~m admissions
        idx = np.argpartition(keys, m - 1)[:m] if m < self._size else np.arange(self._size)
        order = idx[np.argsort(keys[idx], kind="stable")]
        self._low_keys, self._low_slots = keys[order].tolist(), order.tolist()

    def _threshold(self) -> float:
        """T, the smallest kept key."""
        if not self._low_keys:
            self._low_refill()
        return self._low_keys[0]

    def _draw_jump(self) -> None:
        self._x = math.log(self._rng.random()) / self._threshold()  # both logs < 0

    accepts_weights = True

    def weights_for(self, domains: Sequence[str] | None, n: int) -> np.ndarray:
        if domains is None:
            return np.full(n, self.default_weight)
        return np.array([self.domain_weights.get(d, self.default_weight) for d in domains], dtype=np.float64)

    def add_many(self, items: Sequence[np.ndarray] | np.ndarray, domains: Sequence[str] | None = None,
                 weights: Sequence[float] | None = None) -> None:
        """Offer items; ``weights`` (per item, >= 0; 0 is never kept) override the per-domain weights."""
        if weights is not None:
            w_all = np.asarray(weights, dtype=np.float64)
            if w_all.shape != (len(items),):
                raise ValueError(f"{len(items)} items but {w_all.size} weights")
            if not np.all(np.isfinite(w_all) & (w_all >= 0)):
                raise ValueError("weights must be finite and >= 0")
        items, domains, hashes = self._prepare(items, domains, weights)
        if weights is None:
            w_all = self.weights_for(domains, len(items))
        elif self._offered is not None:  # keep the weights aligned with what survived duplicate suppression
            w_all = w_all[self._offered]
        n, pos = len(items), 0
        if self._size < self.capacity:  # fill phase: every item with w > 0 enters with its key
            take = np.flatnonzero(w_all > 0)[: self.capacity - self._size]
            if len(take):
                slots = range(self._size, self._size + len(take))
                self.log_keys[slots.start : slots.stop] = np.log(1.0 - self._rng.random(len(take))) / w_all[take]
                self._store_many(slots, take.tolist(), items, domains, hashes)
                self._size += len(take)
            if self._size == self.capacity:
                self._draw_jump()
                pos = int(take[-1]) + 1
            else:
                pos = n
        if pos < n:  # jump phase: skip ``_x`` of weight, admit the item it lands in
            cum = np.cumsum(w_all[pos:]).tolist()  # weight passed by the end of each remaining item
            passed = 0.0
            chosen: dict[int, int] = {}  # slot -> batch position; a later admission to a slot replaces an earlier one
            while True:
                j = bisect.bisect_left(cum, passed + self._x)
                if j >= len(cum):
                    self._x -= cum[-1] - passed
                    break
                i, w = pos + j, float(w_all[pos + j])
                threshold = self._threshold()  # refills the cache if it ran out
                low_keys, low_slots = self._low_keys, self._low_slots
                slot = low_slots.pop(0)
                low_keys.pop(0)
                t = math.exp(w * threshold)  # the key to beat, T, as a uniform draw: T ** w
                key = math.log(self._rng.uniform(t, 1.0)) / w
                self.log_keys[slot] = key
                if low_keys and key < low_keys[-1]:  # among the m smallest: keep the cache exact
                    at = bisect.bisect_left(low_keys, key)
                    low_keys.insert(at, key)
                    low_slots.insert(at, slot)
                chosen[slot] = i
                self._draw_jump()
                passed = cum[j]
            self._store_many(list(chosen), list(chosen.values()), items, domains, hashes)
        self._seen += n

    def state_dict(self) -> dict[str, Any]:
        state = self._state({"x": self._x, "domain_weights": self.domain_weights, "default_weight": self.default_weight})
        state["arrays"]["log_keys"] = self.log_keys[: self._size].copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = self._load(state)
        self.log_keys[:] = 0.0
        self.log_keys[: self._size] = state["arrays"]["log_keys"]
        self._low_keys, self._low_slots = [], []
        self._x = float(meta["x"])
