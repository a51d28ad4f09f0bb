"""Uniform reservoir with Li's Algorithm L (Li 1994, "Reservoir-sampling algorithms of time
complexity O(n(1 + log(N/n)))").

Every item of the stream ends up in the reservoir with probability ``k / n``.
Instead of drawing a random number per item (Algorithm R), Algorithm L draws
how many items to *skip* before the next admission, from a geometric law whose
parameter ``W`` shrinks as the stream grows; the work per item falls like
``k log(n / k) / n``. With ``u``, ``u'``, ``u''`` uniform on (0, 1]:

    1. when the first k items are in:   W = u ** (1 / k),  p = k - 1  (index of the last item taken)
    2. next admission:                  p += floor(log(u') / log(1 - W)) + 1
    3. it replaces slot                 floor(u'' * k)
    4. then                             W *= u ** (1 / k);  back to 2.

``W`` is the largest of the k smallest uniform keys of the items seen so far,
so a state without it restarts it from its law, ``Beta(k, n - k + 1)``.

Steps 2-4 depend on the stream only through ``p``, so admissions are planned
ahead in blocks with a few numpy calls (``AdmissionPlan``): a batch then costs
one comparison per admission and one array assignment per field, however many
items it skips.
"""

import bisect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from everlearn.buffers.base import SlotBuffer

NEVER = float(2**62)  # a stream index beyond any stream: planned admissions past it never happen


class AdmissionPlan:
    """Algorithm L's next admissions (stream index, slot), planned ``BLOCK`` at a time.

    Its own random stream, so sampling never shifts it. The state is the
    generator state, ``log W`` and ``p`` *before* the current block plus the index
    into it: a restore replans the block and continues exactly.
    """

    BLOCK = 1024  # admissions per plan: one numpy pass, a few hundred microseconds

    def __init__(self, seed: int, stream: int = 0):
        self.k = 0  # reservoir size; set by ``start``
        self._gen = np.random.Generator(np.random.PCG64([seed, 0x5EED, stream]))
        self.positions: list[int] = []  # stream index of each planned admission (increasing)
        self.slots: list[int] = []
        self.i = 0  # next planned admission not yet reached by the stream
        self._log_w, self._p = 0.0, 0  # log W and p after the current block
        self._start: dict[str, Any] | None = None  # (generator state, log W, p) before the current block

    def start(self, capacity: int, last_index: int, w: float | None = None) -> None:
        """A reservoir of ``capacity`` is full with item ``last_index``; plan from there (``W`` drawn, or given).

        Also restarts a plan (another capacity, a ``W`` from its law): the generator goes on, so
        the new plan's draws are independent of the old one's.
        """
        self.k = capacity
        log_w = math.log(1.0 - self._gen.random()) / self.k if w is None else math.log(w)  # 1.
        self._plan(log_w, last_index)

    def _plan(self, log_w0: float, p: int) -> None:
        self._start = {"rng": self._gen.bit_generator.state, "log_w": log_w0, "p": p, "k": self.k}
        u = 1.0 - self._gen.random((3, self.BLOCK))  # (0, 1]: every log is finite
        log_w = log_w0 + np.concatenate(([0.0], np.cumsum(np.log(u[0]) / self.k)))  # log W at each admission, 4.
        with np.errstate(divide="ignore", over="ignore"):  # W underflows ~1e300 items ahead: skip = inf
            skips = np.floor(np.log(u[1]) / np.log1p(-np.exp(log_w[:-1])))  # 2.
            # float64 sums of integers are exact below 2**53 items; later ones are never reached
            positions = np.minimum(p + np.cumsum(skips + 1.0), NEVER).astype(np.int64)
        self.positions = positions.tolist()
        self.slots = np.minimum((u[2] * self.k).astype(np.int64), self.k - 1).tolist()  # 3.
        self.i = 0
        self._log_w, self._p = float(log_w[-1]), self.positions[-1]

    def admissions(self, end: int) -> tuple[list[int], list[int]]:
        """Planned admissions with stream index < ``end``: (stream indices, slots); consumes them."""
        pos_out: list[int] = []
        slot_out: list[int] = []
        while True:
            positions, i = self.positions, self.i
            j = bisect.bisect_left(positions, end, i)
            pos_out += positions[i:j]
            slot_out += self.slots[i:j]
            self.i = j
            if j < len(positions):
                return pos_out, slot_out
            self._plan(self._log_w, self._p)

    def state(self) -> dict[str, Any] | None:
        return None if self._start is None else dict(self._start, i=self.i)

    def load(self, state: dict[str, Any]) -> None:
        self._gen.bit_generator.state = state["rng"]
        self.k = int(state["k"])
        self._plan(float(state["log_w"]), int(state["p"]))
        self.i = int(state["i"])


def w_from_law(rng: np.random.Generator, k: int, n: int) -> float:
    """Algorithm L's ``W`` for a uniform k-sample of n items: the k-th smallest of n uniform keys."""
    return float(rng.beta(k, n - k + 1))


class UniformReservoir(SlotBuffer):
    kind = "uniform"

    def __init__(self, capacity: int, seq_len: int, seed: int = 0, dedup: bool = False):
        super().__init__(capacity, seq_len, seed, dedup)
        self._plan = AdmissionPlan(seed)  # admission draws; sampling uses the base generator

    def add_many(self, items: Sequence[np.ndarray] | np.ndarray, domains: Sequence[str] | None = None,
                 weights: Sequence[float] | None = None) -> None:
        items, domains, hashes = self._prepare(items, domains, weights)
        base, n = self._seen, len(items)
        fill = min(n, self.capacity - self._size)
        if fill:  # fill phase: everything is kept, in stream order
            self._store_many(range(self._size, self._size + fill), range(fill), items, domains, hashes)
            self._size += fill
            if self._size == self.capacity:
                self._plan.start(self.capacity, base + fill - 1)
        if self._size == self.capacity and fill < n:  # skip phase: only admissions cost work
            positions, slots = self._plan.admissions(base + n)
            if positions:
                # a later admission to a slot replaces an earlier one of the same batch: keep the last
                chosen = dict(zip(slots, positions, strict=True))
                self._store_many(list(chosen), [p - base for p in chosen.values()], items, domains, hashes)
        self._seen = base + n

    def state_dict(self) -> dict[str, Any]:
        return self._state({"plan": self._plan.state()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = self._load(state)
        self._plan = AdmissionPlan(self.seed)
        if meta.get("plan") is not None:
            self._plan.load(meta["plan"])
        elif self._size == self.capacity:  # a state without Algorithm L's variables: restart W from its law
            self._plan.start(self.capacity, self._seen - 1, w=w_from_law(self._rng, self.capacity, self._seen))
