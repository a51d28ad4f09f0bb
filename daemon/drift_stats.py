"""The parts of drift detection: PSI and Jensen-Shannon on token histograms, the sliding token window, Page-Hinkley.

Free of config, threads and events (daemon/drift.py adds those), so each part is
tested on its own against values computed by hand (tests/unit/test_drift.py).
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

BLOCKS_PER_WINDOW = 16  # the window slides by 1/16 of itself: fine enough, and 16 x vocab counts to sum
SMOOTHING = 0.5  # pseudo-count per bin (Jeffreys / Krichevsky-Trofimov): a bin empty on one side stays finite, and one stray byte moves PSI by ~1e-4


def _counts(reference: Sequence[int] | np.ndarray, current: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 1:
        raise ValueError(f"histograms must be 1-D and of one length, got shapes {ref.shape} and {cur.shape}")
    if ref.sum() <= 0 or cur.sum() <= 0:
        raise ValueError(f"a histogram is empty (reference {ref.sum():.0f} counts, current {cur.sum():.0f}): nothing to compare yet")
    return ref, cur


def psi(reference: Sequence[int] | np.ndarray, current: Sequence[int] | np.ndarray, smoothing: float = SMOOTHING) -> float:
    """Population stability index: sum over bins of (q - p) * ln(q / p), p the reference share, q the current one.

    PSI is the symmetric Kullback-Leibler divergence (KL(q||p) + KL(p||q)), in nats.
    Bins empty in both histograms carry no information and are left out (a byte
    vocabulary has ~125 ids that text never uses); the rest get ``smoothing``
    extra counts each, so a byte seen on one side only adds a large but finite
    term instead of infinity. Conventional reading (credit scorecards): < 0.1 no
    significant change, 0.1-0.25 moderate, > 0.25 significant.
    """
    ref, cur = _counts(reference, current)
    support = (ref + cur) > 0
    ref, cur = ref[support] + smoothing, cur[support] + smoothing
    p, q = ref / ref.sum(), cur / cur.sum()
    return float(np.sum((q - p) * np.log(q / p)))


def js_divergence(reference: Sequence[int] | np.ndarray, current: Sequence[int] | np.ndarray) -> float:
    """Jensen-Shannon divergence in bits: 0 for equal shares, 1 for disjoint supports; always finite, no smoothing."""
    ref, cur = _counts(reference, current)
    p, q = ref / ref.sum(), cur / cur.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0  # 0 * log 0 = 0; where a > 0, m > 0 too
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return min(1.0, max(0.0, 0.5 * kl(p) + 0.5 * kl(q)))  # clamp rounding just outside [0, 1]


def top_changes(reference: np.ndarray, current: np.ndarray, k: int = 5) -> list[tuple[int, float, float]]:
    """The ``k`` token ids whose share moved most: (id, reference share, current share), for messages."""
    ref, cur = _counts(reference, current)
    p, q = ref / ref.sum(), cur / cur.sum()
    order = np.argsort(-np.abs(q - p), kind="stable")[:k]
    return [(int(i), round(float(p[i]), 4), round(float(q[i]), 4)) for i in order if p[i] != q[i]]


class TokenWindows:
    """A reference histogram and a sliding window of the newest tokens, disjoint from it.

    Tokens are cut into blocks of ``window_tokens // 16``, one histogram each, in
    a ring spanning ``reference_tokens``: the window (the newest sealed blocks plus
    the one being filled) slides a block at a time in O(vocab), and memory stays
    bounded whatever the document sizes. Until a reference exists (``pending``)
    tokens only fill the ring; once it spans ``reference_tokens`` it becomes the
    reference. ``take_reference()`` makes the ring (the newest ~reference_tokens
    tokens) the reference again and empties the window: a token never counts in
    both. Not thread-safe: the owner locks.
    """

    def __init__(self, vocab_size: int, reference_tokens: int, window_tokens: int):
        self.vocab, self.reference_tokens = vocab_size, reference_tokens
        self.block = max(1, window_tokens // BLOCKS_PER_WINDOW)
        self.window_blocks = max(1, window_tokens // self.block)
        self.capacity = max(self.window_blocks, math.ceil(reference_tokens / self.block))
        self.reference = np.zeros(vocab_size, np.int64)
        self.pending = True  # no reference yet: the stream's first reference_tokens tokens become it
        self.clear_ring()

    def clear_ring(self) -> None:
        self.ring = np.zeros((self.capacity, self.vocab), np.int64)  # one histogram per sealed block
        self.sizes = np.zeros(self.capacity, np.int64)  # its tokens (a block cut by take_reference is short)
        self.head, self.filled, self.since = 0, 0, 0  # next slot; sealed blocks held; sealed since the reference
        self.history = np.zeros(self.vocab, np.int64)  # sum of the ring
        self.window = np.zeros(self.vocab, np.int64)  # sum of the newest min(since, window_blocks) blocks
        self.open = np.zeros(self.vocab, np.int64)  # the block being filled, also part of the window
        self.open_n = 0

    @property
    def current(self) -> np.ndarray:
        """The window's histogram: the newest sealed blocks and, once a reference exists, the open one."""
        return self.window if self.pending else self.window + self.open

    @property
    def window_size(self) -> int:
        return int(self.window.sum()) + (0 if self.pending else self.open_n)

    def add(self, tokens: np.ndarray) -> bool:
        """Count tokens (ids in [0, vocab), checked by the caller); True when they completed the first reference."""
        pos, took = 0, False
        while pos < len(tokens):
            take = min(self.block - self.open_n, len(tokens) - pos)
            self.open += np.bincount(tokens[pos : pos + take], minlength=self.vocab)
            self.open_n, pos = self.open_n + take, pos + take
            if self.open_n == self.block:
                self._seal(counts_in_window=not self.pending)
                if self.pending and int(self.sizes.sum()) >= self.reference_tokens:
                    took = self.take_reference()
        return took

    def _seal(self, counts_in_window: bool) -> None:
        slot = self.head
        if self.filled == self.capacity:
            self.history -= self.ring[slot]
        self.ring[slot], self.sizes[slot] = self.open, self.open_n
        self.history += self.open
        self.head, self.filled = (slot + 1) % self.capacity, min(self.filled + 1, self.capacity)
        if counts_in_window:
            self.window += self.open
            self.since += 1
            if self.since > self.window_blocks:  # the block sliding out was sealed after the reference: still in the ring
                self.window -= self.ring[(slot - self.window_blocks) % self.capacity]
        self.open, self.open_n = np.zeros(self.vocab, np.int64), 0

    def take_reference(self) -> bool:
        """The newest ~reference_tokens tokens become the reference and the window starts empty; False if nothing was seen."""
        if self.open_n:
            self._seal(counts_in_window=False)
        if not self.history.any():
            return False
        self.reference = self.history.copy()
        self.window[:] = 0
        self.since, self.pending = 0, False
        return True

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"ring": self.ring.astype(np.int32), "sizes": self.sizes.copy(), "open": self.open.copy(),
                  "reference": self.reference.copy()}
        meta = {"block": self.block, "capacity": self.capacity, "head": self.head, "filled": self.filled,
                "since": self.since, "open_n": self.open_n, "pending": self.pending}
        return arrays, meta

    def load(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore ``state()``; from other window sizes only the reference is kept and the window fills again."""
        reference = np.asarray(arrays["reference"], np.int64)
        ring, sizes = np.asarray(arrays["ring"], np.int64), np.asarray(arrays["sizes"], np.int64)
        same = (meta["block"], meta["capacity"]) == (self.block, self.capacity)
        if reference.shape != (self.vocab,) or (same and (
                ring.shape != (self.capacity, self.vocab) or not np.array_equal(ring.sum(axis=1), sizes)
                or not 0 <= meta["head"] < self.capacity or not 0 <= meta["filled"] <= self.capacity
                or min(meta["since"], self.window_blocks) > meta["filled"])):
            raise ValueError(f"drift state is damaged (reference {reference.shape}, ring {ring.shape}, block sizes "
                             "disagreeing with the ring or positions out of range): drop it to start from a new reference")
        self.clear_ring()
        self.reference, self.pending = reference, bool(meta["pending"])
        if not same:
            return
        self.ring, self.sizes, self.history = ring, sizes, ring.sum(axis=0)
        self.head, self.filled, self.since = int(meta["head"]), int(meta["filled"]), int(meta["since"])
        self.open, self.open_n = np.asarray(arrays["open"], np.int64), int(meta["open_n"])
        for k in range(1, min(self.since, self.window_blocks) + 1):
            self.window += self.ring[(self.head - k) % self.capacity]


class PageHinkley:
    """Page-Hinkley test for a change in the mean of a stream (Page 1954; Hinkley 1971), as in river's ``PageHinkley``.

    For samples x_1..x_t with running mean xbar_t (x_t included):

        m_t = sum_{i<=t} (x_i - xbar_i - delta)     M_t = min_{1<=i<=t} m_i     PH_t = m_t - M_t

    and an increase is declared when PH_t > threshold (lambda) once at least
    ``min_samples`` samples were seen. ``delta`` is the rise per sample that is
    tolerated: it pulls m_t down every step, so noise around a constant mean
    cannot accumulate; a rise of the mean by d > delta adds about d - delta per
    sample, so it is found after roughly threshold / (d - delta) samples. The
    two-sided variant also tracks u_t = sum (x_i - xbar_i + delta) against its
    maximum for a decrease. After a detection the test starts over (mean
    included), so a new level is learned instead of firing again. No fading
    factor (river's ``alpha``): the daemon resets the test when serving changes.
    """

    def __init__(self, delta: float, threshold: float, min_samples: int, two_sided: bool = False):
        self.delta, self.threshold, self.min_samples, self.two_sided = delta, threshold, min_samples, two_sided
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.sum_up, self.min_up = 0.0, math.inf
        self.sum_down, self.max_down = 0.0, -math.inf

    @property
    def statistic_up(self) -> float:
        return self.sum_up - self.min_up if self.n else 0.0

    @property
    def statistic_down(self) -> float:
        return self.max_down - self.sum_down if self.n else 0.0

    def update(self, x: float) -> tuple[str, float, int] | None:
        """Add one sample; on a detection, (``"up"`` or ``"down"``, PH statistic, samples used), and the test starts over."""
        self.n += 1
        self.mean += (x - self.mean) / self.n
        dev = x - self.mean
        self.sum_up += dev - self.delta
        self.min_up = min(self.min_up, self.sum_up)
        self.sum_down += dev + self.delta
        self.max_down = max(self.max_down, self.sum_down)
        if self.n < self.min_samples:
            return None
        found = None
        if self.statistic_up > self.threshold:
            found = ("up", self.statistic_up, self.n)
        elif self.two_sided and self.statistic_down > self.threshold:
            found = ("down", self.statistic_down, self.n)
        if found:
            self.reset()
        return found

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: the infinities of a fresh test are written as null."""
        def finite(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {"n": self.n, "mean": self.mean, "sum_up": self.sum_up, "min_up": finite(self.min_up),
                "sum_down": self.sum_down, "max_down": finite(self.max_down)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.n, self.mean = int(state["n"]), float(state["mean"])
            self.sum_up, self.sum_down = float(state["sum_up"]), float(state["sum_down"])
            self.min_up = math.inf if state["min_up"] is None else float(state["min_up"])
            self.max_down = -math.inf if state["max_down"] is None else float(state["max_down"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Page-Hinkley state is malformed ({type(e).__name__}: {e}); expected the keys of "
                             "PageHinkley.state_dict(): n, mean, sum_up, min_up, sum_down, max_down") from e
