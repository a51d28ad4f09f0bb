"""Replay share per step (learners/replay.py): the boost formula, shift detection, and ReplayMixer following it."""

import json
from collections import Counter

import numpy as np
import pytest

from everlearn.buffers import StratifiedReservoir, UniformReservoir, WeightedReservoir
from everlearn.learners.batching import ReplayMixer
from everlearn.learners.replay import DomainShift, ReplaySchedule, replay_fraction, total_variation

pytestmark = pytest.mark.unit

# dyadic values: every point of the linear fall-back is exact in binary floating point
BASE, BOOST, STEPS = 0.25, 0.75, 4


# -- replay_fraction --------------------------------------------------------------


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, BASE),  # phase 1: before the anchor
        (9, BASE),  # the step just before it
        (10, BOOST),  # phase 2 starts at the anchor with the full boost
        (11, 0.625),  # 0.75 - 0.5 * 1/4
        (12, 0.5),  # half-way: the mean of boost and base
        (13, 0.375),  # 0.75 - 0.5 * 3/4
        (14, BASE),  # phase 3: anchor + steps is base again
        (1000, BASE),
    ],
)
def test_replay_fraction_phases(step, expected):
    assert replay_fraction(step, BASE, BOOST, STEPS, shift_step=10) == expected


def test_replay_fraction_follows_the_formula_at_every_step_of_the_boost():
    base, boost, steps, s = 0.1, 0.6, 7, 3
    for step in range(s, s + steps):
        assert replay_fraction(step, base, boost, steps, s) == pytest.approx(boost - (boost - base) * (step - s) / steps)
    assert replay_fraction(s + steps, base, boost, steps, s) == base


@pytest.mark.parametrize("step", [0, 10, 11, 14, 100])
def test_replay_fraction_without_boost_or_shift_is_base(step):
    assert replay_fraction(step, BASE, None, STEPS, shift_step=10) == BASE
    assert replay_fraction(step, BASE, BOOST, STEPS, shift_step=None) == BASE


# -- total_variation ----------------------------------------------------------------


def test_total_variation_identical_mixes_is_zero():
    assert total_variation(Counter(a=3, b=1), Counter(a=3, b=1)) == 0.0
    assert total_variation(Counter(a=3, b=1), Counter(a=6, b=2)) == 0.0  # shares, not counts


def test_total_variation_disjoint_domains_is_one():
    assert total_variation(Counter(a=2, b=5), Counter(c=1, d=1)) == 1.0


def test_total_variation_by_hand():
    # shares a: 1/4 vs 1/2, b: 3/4 vs 0, c: 0 vs 1/2 -> (1/4 + 3/4 + 1/2) / 2 = 3/4
    assert total_variation(Counter(a=1, b=3), Counter(a=2, c=2)) == 0.75
    # a: 1/2 vs 1/4, b: 1/2 vs 3/4 -> (1/4 + 1/4) / 2 = 1/4, and symmetric
    assert total_variation(Counter(a=2, b=2), Counter(a=1, b=3)) == 0.25
    assert total_variation(Counter(a=1, b=3), Counter(a=2, b=2)) == 0.25


def test_total_variation_with_an_empty_side_is_zero():
    assert total_variation(Counter(), Counter(a=1)) == 0.0
    assert total_variation(Counter(a=1), Counter()) == 0.0


# -- DomainShift ----------------------------------------------------------------------


def test_no_shift_before_two_full_windows_of_history():
    det = DomainShift(window=4, threshold=0.1)
    # 7 sequences: one short of two windows, although the mix changes completely
    results = [det.observe([d]) for d in "aaaabbb"]
    assert results == [False] * 7
    assert det.distance == 0.0
    assert det.observe(["b"]) is True  # the 8th completes the history: [a a a a] vs [b b b b]
    assert det.distance == 1.0


def test_switch_from_a_to_b_by_hand():
    det = DomainShift(window=4, threshold=0.5)
    assert [det.observe(["a"]) for _ in range(8)] == [False] * 8
    assert det.distance == 0.0
    # recent window (newest 4) vs the 4 before it, one b at a time:
    expected = [
        (0.25, False),  # [a a a b] vs [a a a a]
        (0.5, True),  # [a a b b] vs [a a a a]: at the threshold counts
        (0.75, True),  # [a b b b] vs [a a a a]
        (1.0, True),  # [b b b b] vs [a a a a]
        (0.75, True),  # [b b b b] vs [a a a b]: the boost holds while the mix keeps changing
        (0.5, True),  # vs [a a b b]
        (0.25, False),  # vs [a b b b]
        (0.0, False),  # vs [b b b b]: settled
    ]
    for want_distance, want_shift in expected:
        assert det.observe(["b"]) is want_shift
        assert det.distance == want_distance


def test_distance_of_a_batch_observation_by_hand():
    det = DomainShift(window=4, threshold=0.8)
    assert det.observe(["a", "a", "c", "c"]) is False
    # before [a a c c], recent [a b b b]: a 1/2 vs 1/4, b 0 vs 3/4, c 1/2 vs 0 -> 3/4
    assert det.observe(["a", "b", "b", "b"]) is False  # 0.75 < 0.8
    assert det.distance == 0.75
    assert det.observe(["c", "c", "c", "c"]) is True  # [c c c c] vs [a b b b]: disjoint
    assert det.distance == 1.0


def test_a_steady_mix_never_fires():
    det = DomainShift(window=6, threshold=0.1)
    fired = [det.observe([d]) for d in "abc" * 100]
    assert not any(fired)
    assert det.distance == 0.0
    # in batches that do not line up with the period either
    det = DomainShift(window=6, threshold=0.1)
    stream = list("abc" * 100)
    assert not any(det.observe(stream[i : i + 5]) for i in range(0, len(stream), 5))


def test_counters_stay_bounded_with_a_new_domain_every_sequence():
    window = 8
    det = DomainShift(window=window, threshold=0.5)
    for i in range(2000):
        shifted = det.observe([f"dom-{i}"])
        assert len(det._recent_counts) <= window and len(det._before_counts) <= window
        assert len(det._recent) <= window and len(det._before) <= window
        assert shifted is (i >= 2 * window - 1)  # every window disjoint from the one before
    assert len(det._recent_counts) == window and len(det._before_counts) == window
    assert det._recent_counts == Counter(f"dom-{i}" for i in range(2000 - window, 2000))
    assert len(det.state_dict()["domains"]) == 2 * window


def test_state_round_trip_then_identical_future_observations():
    rng = np.random.default_rng(5)
    past = [str(d) for d in rng.choice(["a", "b", "c"], size=37)]
    future = [str(d) for d in rng.choice(["a", "d"], size=60, p=[0.2, 0.8])]
    a = DomainShift(window=5, threshold=0.4)
    for d in past:
        a.observe([d])
    state = json.loads(json.dumps(a.state_dict()))  # stored as JSON in the checkpoint
    assert state == {"domains": past[-10:]}

    b = DomainShift(window=5, threshold=0.4)
    b.observe(["junk"] * 12)  # replaced by the loaded state
    b.load_state_dict(state)
    assert b._recent_counts == a._recent_counts and b._before_counts == a._before_counts
    got_a, got_b = [], []
    for i in range(0, len(future), 3):
        got_a.append((a.observe(future[i : i + 3]), a.distance))
        got_b.append((b.observe(future[i : i + 3]), b.distance))
    assert got_a == got_b
    assert any(s for s, _ in got_a)  # the future does shift: the comparison is not vacuous
    assert b.state_dict() == a.state_dict()


def test_load_keeps_only_the_last_two_windows():
    det = DomainShift(window=2, threshold=0.5)
    det.load_state_dict({"domains": ["x", "x", "x", "a", "a", "b", "b"]})
    assert det.state_dict() == {"domains": ["a", "a", "b", "b"]}
    assert det._before_counts == Counter(a=2) and det._recent_counts == Counter(b=2)


# -- ReplaySchedule -------------------------------------------------------------------


def drive(schedule, steps, domains):
    return [schedule.observe(step, domains) for step in steps]


def test_schedule_anchors_the_boost_on_the_step_after_a_shift():
    sched = ReplaySchedule(BASE, BOOST, STEPS, window=2, threshold=0.5)
    assert drive(sched, range(10), ["a", "a"]) == [False] * 10
    assert sched.shift_step is None and sched.shifts == 0
    assert sched(10) == BASE
    assert sched.observe(10, ["b", "b"]) is True  # [b b] vs [a a]
    assert sched.shift_step == 11 and sched.shifts == 1
    assert sched(10) == BASE  # the batch of step 10 was already drawn
    assert drive(sched, range(11, 20), ["b", "b"]) == [False] * 9  # settled: the anchor stays
    assert [sched(s) for s in range(11, 16)] == [0.75, 0.625, 0.5, 0.375, BASE]
    assert sched.shift_step == 11 and sched.shifts == 1


def test_schedule_re_anchors_on_a_later_shift():
    sched = ReplaySchedule(BASE, BOOST, STEPS, window=2, threshold=0.5)
    drive(sched, range(3), ["a", "a"])
    assert sched.observe(3, ["b", "b"]) is True
    assert sched(5) == 0.625
    assert sched.observe(5, ["c", "c"]) is True
    assert sched.shift_step == 6 and sched.shifts == 2
    assert sched(6) == BOOST


def test_schedule_without_boost_detects_but_stays_at_base():
    sched = ReplaySchedule(BASE, None, STEPS, window=2, threshold=0.5)
    drive(sched, range(3), ["a", "a"])
    assert sched.observe(3, ["b", "b"]) is True
    assert sched.shift_step == 4
    assert [sched(s) for s in range(10)] == [BASE] * 10


def test_schedule_state_round_trip():
    a = ReplaySchedule(BASE, BOOST, STEPS, window=2, threshold=0.5)
    drive(a, range(10), ["a", "a"])
    assert a.observe(10, ["b", "b"]) is True
    assert a.observe(11, ["a", "b"]) is True  # [a b] vs [b b]: 0.5, re-anchored at 12
    state = json.loads(json.dumps(a.state_dict()))  # stored as JSON in the checkpoint
    assert state == {"shift_step": 12, "detector": {"domains": ["b", "b", "a", "b"]}}

    b = ReplaySchedule(BASE, BOOST, STEPS, window=2, threshold=0.5)
    drive(b, range(5), ["z", "z"])  # replaced by the loaded state
    b.load_state_dict(state)
    assert b.shift_step == 12
    assert b.shifts == 0  # shifts counts this process's declarations only
    assert [b(s) for s in range(10, 18)] == [a(s) for s in range(10, 18)] == [BASE, BASE, 0.75, 0.625, 0.5, 0.375, BASE, BASE]
    future = [["a", "b"], ["c", "c"], ["c", "a"], ["a", "a"], ["a", "a"]]
    # [a b] vs [a b]: 0 | [c c] vs [a b]: 1 | [c a] vs [c c]: 0.5 | [a a] vs [c a]: 0.5 | [a a] vs [a a]: 0
    got = []
    for step, doms in enumerate(future, start=12):
        got.append(a.observe(step, doms))
        assert b.observe(step, doms) is got[-1]
        assert b.shift_step == a.shift_step
    assert got == [False, True, True, True, False]
    assert a.shift_step == 16
    assert b.state_dict() == a.state_dict()


def test_schedule_loads_a_state_without_detector():
    sched = ReplaySchedule(BASE, BOOST, STEPS, window=2, threshold=0.5)
    drive(sched, range(3), ["a", "a"])
    sched.load_state_dict({"shift_step": 7})
    assert sched.shift_step == 7 and sched(7) == BOOST
    assert sched.detector.state_dict() == {"domains": []}


# -- ReplayMixer with a schedule ---------------------------------------------------------


def windows(n, seq_len=4, start=10):
    return np.arange(start, start + n * seq_len, dtype=np.int32).reshape(n, seq_len)


def test_mixer_follows_a_boosted_schedule():
    buf = UniformReservoir(capacity=64, seq_len=4, seed=0)
    sched = ReplaySchedule(BASE, BOOST, STEPS, window=2, threshold=0.5)
    mixer = ReplayMixer(buf, sched, batch_size=8)
    assert mixer.schedule is sched
    assert mixer.n_replay(0) == 0  # nothing to replay yet
    for step in range(4):
        assert mixer.remember(windows(2, start=10 + 8 * step), ["a", "a"], step) is False
    assert len(buf) == 8 and buf.seen == 8
    assert (mixer.n_replay(4), mixer.n_fresh(4)) == (2, 6)  # round(0.25 * 8)
    assert mixer.remember(windows(2, start=200), ["b", "b"], step=4) is True
    assert sched.shift_step == 5
    # round(r * 8) for r = 0.75, 0.625, 0.5, 0.375, 0.25
    assert [mixer.n_replay(s) for s in range(4, 11)] == [2, 6, 5, 4, 3, 2, 2]
    assert [mixer.n_fresh(s) for s in range(4, 11)] == [6, 2, 3, 4, 5, 6, 6]


def test_mixer_with_a_plain_fraction_ignores_the_step():
    mixer = ReplayMixer(UniformReservoir(capacity=8, seq_len=4), 0.25, batch_size=8)
    mixer.remember(windows(2), ["a", "a"], step=0)
    assert mixer.schedule.boost is None
    assert {mixer.n_replay(s) for s in range(0, 500, 37)} == {2}


def test_remember_passes_weights_to_a_weighted_reservoir():
    buf = WeightedReservoir(capacity=8, seq_len=4, seed=0, domain_weights={"a": 5.0})
    mixer = ReplayMixer(buf, ReplaySchedule(BASE, BOOST, STEPS, window=2, threshold=0.5), batch_size=4)
    fresh = windows(3)
    # during fill every item with weight > 0 enters; weight 0 is never kept, whatever its domain weighs
    assert mixer.remember(fresh, ["a", "a", "a"], step=0, weights=[2.0, 0.0, 0.5]) is False
    assert buf.seen == 3 and len(buf) == 2
    assert [s.tolist() for s in buf.items()] == [fresh[0].tolist(), fresh[2].tolist()]
    assert buf.domain_counts() == {"a": 2}
    # the domains still reach the detector: [a a] vs [b b] shifts
    assert mixer.remember(windows(2, start=100), ["b", "b"], step=1, weights=[1.0, 1.0]) is True
    assert mixer.schedule.shift_step == 2
    # without weights the domain weights apply (5 > 0: all kept)
    mixer.remember(windows(2, start=200), ["a", "a"], step=2)
    assert len(buf) == 6


class RecordingBuffer:
    """A buffer whose add_many takes no weights: remember must not pass any when it has none."""

    def __init__(self):
        self.calls = []

    def __len__(self):
        return 0

    def add_many(self, items, domains):
        self.calls.append((items, domains))


def test_remember_without_weights_does_not_pass_the_keyword():
    buf = RecordingBuffer()
    mixer = ReplayMixer(buf, 0.25, batch_size=4)
    fresh = windows(2)
    assert mixer.remember(fresh, ["a", "b"], step=3) is False
    assert len(buf.calls) == 1
    assert buf.calls[0][0] is fresh and buf.calls[0][1] == ["a", "b"]


@pytest.mark.parametrize("make", [
    lambda: UniformReservoir(capacity=8, seq_len=4),
    lambda: StratifiedReservoir(capacity=8, seq_len=4),
], ids=["uniform", "stratified"])
def test_remember_with_weights_into_an_unweighted_buffer_raises(make):
    buf = make()
    mixer = ReplayMixer(buf, ReplaySchedule(BASE, BOOST, STEPS, window=1, threshold=0.5), batch_size=4)
    with pytest.raises(ValueError, match="weighted"):
        mixer.remember(windows(2), ["a", "a"], step=0, weights=[1.0, 2.0])
    assert len(buf) == 0 and buf.seen == 0  # nothing stored
    assert mixer.schedule.detector.state_dict() == {"domains": []}  # nor observed
