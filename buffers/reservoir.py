"""Uniform reservoir with Li's Algorithm L (Li 1994, "Reservoir-sampling algorithms of time
complexity O(n(1 + log(N/n)))").

Every item of the stream ends up in the reservoir with probability ``k / n``.
Instead of drawing a random number per item (Algorithm R), Algorithm L draws
how many items to *skip* before the next admission, from a geometric law whose
parameter ``W`` shrinks as the stream grows; the work per item falls like
``k log(n / k) / n``. With ``u``, ``u'`` uniform on (0, 1):

    after the first k items:   W = u ** (1 / k)
    skip before the next one:  floor(log(u) / log(1 - W))
    on each admission:         replace a uniform slot;  W *= u' ** (1 / k)

``W`` is the largest of the k smallest uniform keys of the items seen so far,
so a resized or restored reservoir restarts it from ``Beta(k, n - k + 1)``.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from everlearn.buffers.base import BlockUniforms, SlotBuffer


class UniformReservoir(SlotBuffer):
    kind = "uniform"

    def __init__(self, capacity: int, seq_len: int, seed: int = 0, dedup: bool = False):
        super().__init__(capacity, seq_len, seed, dedup)
        self._u = BlockUniforms(seed)  # admission draws; sampling uses the base generator
        self._w = 0.0  # Algorithm L's W; 0 until the reservoir is full
        self._next = 0  # stream index (0-based, over admitted-eligible items) of the next admission

    def _skip(self) -> int:
        u = self._u()
        return int(math.log(u) / math.log1p(-self._w)) if self._w > 0 else 0  # both logs <= 0: int() floors

    def _advance(self) -> None:
        self._w *= math.exp(math.log(self._u()) / self.capacity)
        self._next += self._skip() + 1

    def add_many(self, items: Sequence[np.ndarray], domains: Sequence[str] | None = None) -> None:
        items, doms, hashes = self._prepare(items, domains)
        base, n = self._seen, len(items)
        i = 0
        while self._size < self.capacity and i < n:  # fill phase: everything is kept
            self._store(self._size, items[i], doms[i], hashes[i])
            self._size += 1
            i += 1
            if self._size == self.capacity:
                self._w = math.exp(math.log(self._u()) / self.capacity)
                self._next = base + i + self._skip()
        end = base + n
        while self._size == self.capacity and self._next < end:  # skip phase: only admissions cost work
            j = self._next - base
            slot = min(int((1.0 - self._u()) * self.capacity), self.capacity - 1)
            self._store(slot, items[j], doms[j], hashes[j])
            self._advance()
        self._seen = end

    def state_dict(self) -> dict[str, Any]:
        return self._state({"w": self._w, "next": self._next, "uniforms": self._u.state()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = self._load(state)
        if "uniforms" in meta:
            self._u.load(meta["uniforms"])
        if "w" in meta:
            self._w, self._next = float(meta["w"]), int(meta["next"])
        elif self._size == self.capacity:  # a state without Algorithm L's variables: restart W from its law
            self._w = float(self._rng.beta(self.capacity, self._seen - self.capacity + 1))
            self._next = self._seen + self._skip()
