"""How much of each batch is replay: a base share, boosted for a while after the stream's domain mix shifts.

Right after the fresh stream turns to other domains, the old ones are no longer
in the fresh data and are most at risk of being forgotten; more replay then,
less once the model has settled. With ``s`` the step of the last shift:

    1. no shift yet, or no boost:  r = base
    2. s <= step < s + steps:       r = boost - (boost - base) * (step - s) / steps
    3. step >= s + steps:           r = base

A shift is declared when the domain mix of the last ``window`` fresh sequences
differs from the ``window`` before them by a total variation distance of at
least ``threshold`` (half the summed absolute differences of the domain shares).
While the mix keeps changing, shifts keep being declared and the boost holds.
"""

from collections import Counter, deque
from collections.abc import Sequence
from typing import Any


def replay_fraction(step: int, base: float, boost: float | None, boost_steps: int, shift_step: int | None) -> float:
    """The replay share of the batch at ``step`` (phases 1-3 above)."""
    if boost is None or shift_step is None or step < shift_step:  # 1.
        return base
    if step < shift_step + boost_steps:  # 2.
        return boost - (boost - base) * (step - shift_step) / boost_steps
    return base  # 3.


def total_variation(a: Counter, b: Counter) -> float:
    """Half the L1 distance between the two count vectors' shares (0: same mix, 1: disjoint domains)."""
    na, nb = sum(a.values()), sum(b.values())
    if na == 0 or nb == 0:
        return 0.0
    return 0.5 * sum(abs(a[d] / na - b[d] / nb) for d in a.keys() | b.keys())


def _drop(counts: Counter, key: str) -> None:
    """One fewer ``key``; a key that reaches 0 is removed, so the counters never outgrow the windows."""
    counts[key] -= 1
    if counts[key] == 0:
        del counts[key]


class DomainShift:
    """Watches the domains of fresh sequences; ``observe`` says whether the mix just shifted.

    Holds the last ``2 * window`` domain names: bounded whatever the stream.
    """

    def __init__(self, window: int, threshold: float):
        self.window = window
        self.threshold = threshold
        self._recent: deque[str] = deque()  # the newest ``window`` domains
        self._before: deque[str] = deque()  # the ``window`` before them
        self._recent_counts: Counter = Counter()
        self._before_counts: Counter = Counter()
        self.distance = 0.0  # total variation at the last observation

    def _push(self, domain: str) -> None:
        self._recent.append(domain)
        self._recent_counts[domain] += 1
        if len(self._recent) > self.window:
            moved = self._recent.popleft()
            _drop(self._recent_counts, moved)
            self._before.append(moved)
            self._before_counts[moved] += 1
            if len(self._before) > self.window:
                _drop(self._before_counts, self._before.popleft())

    def observe(self, domains: Sequence[str]) -> bool:
        for d in domains:
            self._push(d)
        if len(self._before) < self.window:  # no history to compare with yet
            return False
        self.distance = total_variation(self._recent_counts, self._before_counts)
        return self.distance >= self.threshold

    def state_dict(self) -> dict[str, Any]:
        return {"domains": [*self._before, *self._recent]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for q in (self._recent, self._before, self._recent_counts, self._before_counts):
            q.clear()
        for d in state["domains"][-2 * self.window :]:  # the same windows again, declaring nothing
            self._push(d)


class ReplaySchedule:
    """The replay share per step, and the shift detector that anchors its boost."""

    def __init__(self, base: float, boost: float | None = None, boost_steps: int = 200,
                 window: int = 64, threshold: float = 0.5):
        self.base, self.boost, self.boost_steps = base, boost, boost_steps
        self.detector = DomainShift(window, threshold)
        self.shift_step: int | None = None  # step of the last declared shift
        self.shifts = 0  # shifts declared by this process

    def __call__(self, step: int) -> float:
        return replay_fraction(step, self.base, self.boost, self.boost_steps, self.shift_step)

    def observe(self, step: int, domains: Sequence[str]) -> bool:
        """Record the domains trained at ``step``; True when they shift the mix (the boost restarts at the next step)."""
        shifted = self.detector.observe(domains)
        if shifted:
            self.shift_step = step + 1
            self.shifts += 1
        return shifted

    def restart_boost(self, step: int) -> None:
        """Start the boost again at the next step, as a declared shift does (a drift event that domains did not show)."""
        self.shift_step = step + 1
        self.shifts += 1

    def state_dict(self) -> dict[str, Any]:
        return {"shift_step": self.shift_step, "detector": self.detector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shift_step = state.get("shift_step")
        self.detector.load_state_dict(state.get("detector", {"domains": []}))
