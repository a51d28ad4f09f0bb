"""WeightedReservoir (A-ExpJ): inclusion frequencies match weighted sampling without replacement."""

import itertools

import numpy as np
import pytest

from everlearn.buffers import ReplayBuffer
from everlearn.buffers.weighted import WeightedReservoir

pytestmark = pytest.mark.unit


def seqs(values):
    return [np.full(1, v, dtype=np.int32) for v in values]


def exact_inclusion(weights: list[float], k: int) -> np.ndarray:
    """P(item i in a size-k sample drawn successively with probability proportional to weight)."""
    n, total = len(weights), sum(weights)
    p = np.zeros(n)
    for order in itertools.permutations(range(n), k):
        prob, left = 1.0, total
        for i in order:
            prob *= weights[i] / left
            left -= weights[i]
        for i in order:
            p[i] += prob
    return p


def inclusion_counts(weights, k, trials, batch):
    counts = np.zeros(len(weights))
    for seed in range(trials):
        buf = WeightedReservoir(capacity=k, seq_len=1, seed=seed)
        for start in range(0, len(weights), batch):
            buf.add_many(seqs(range(start, min(start + batch, len(weights)))), weights=weights[start : start + batch])
        for s in buf.items():
            counts[int(s[0])] += 1
    return counts


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_inclusion_frequencies_match_successive_sampling(batch):
    weights = [1.0, 2.0, 0.5, 4.0, 1.0, 3.0, 0.25, 2.0]
    k, trials = 3, 3000
    expected = exact_inclusion(weights, k)
    counts = inclusion_counts(weights, k, trials, batch)
    sd = np.sqrt(trials * expected * (1 - expected))
    z = (counts - trials * expected) / sd
    assert np.all(np.abs(z) < 4.5), (counts / trials, expected)
    # and it is not merely uniform: the heaviest item is kept far more often than the lightest
    assert counts[3] > 3 * counts[6]


def test_a_uniform_reservoir_would_fail_the_weighted_check():
    weights = [1.0, 2.0, 0.5, 4.0, 1.0, 3.0, 0.25, 2.0]
    expected = exact_inclusion(weights, 3)
    uniform = np.full(len(weights), 3 / len(weights))
    z = (uniform - expected) / np.sqrt(expected * (1 - expected) / 3000)
    assert np.max(np.abs(z)) > 4.5  # the test above has the power to tell them apart


def test_domain_weights_from_config():
    counts = {"rare": 0, "common": 0}
    for seed in range(300):
        buf = WeightedReservoir(capacity=10, seq_len=1, seed=seed, domain_weights={"rare": 0.1, "common": 1.0})
        doms = ["rare", "common"] * 50
        buf.add_many(seqs(range(100)), doms)
        for name, c in buf.domain_counts().items():
            counts[name] += c
    assert counts["common"] > 5 * counts["rare"]


def test_protocol_bounds_and_state_round_trip():
    buf = WeightedReservoir(capacity=5, seq_len=2, seed=7, domain_weights={"a": 2.0})
    assert isinstance(buf, ReplayBuffer)
    buf.add_many(seqs(range(40)), ["a", "b"] * 20)
    assert len(buf) == 5 and buf.seen == 40
    clone = WeightedReservoir(capacity=5, seq_len=2, seed=99, domain_weights={"a": 2.0})
    clone.load_state_dict(buf.state_dict())
    for b in (buf, clone):
        b.add_many(seqs(range(40, 400)), ["a", "b"] * 180)
    assert [int(s[0]) for s in buf.items()] == [int(s[0]) for s in clone.items()]
    np.testing.assert_array_equal(buf.sample(16), clone.sample(16))


def test_non_positive_weights_never_enter():
    buf = WeightedReservoir(capacity=3, seq_len=1, seed=0)
    buf.add_many(seqs(range(6)), weights=[0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    assert sorted(int(s[0]) for s in buf.items()) == [1, 3, 5]
    with pytest.raises(ValueError):
        WeightedReservoir(capacity=3, seq_len=1, domain_weights={"x": 0.0})
    assert buf.seen == 6


def test_dedup_keeps_weights_aligned_with_the_surviving_items():
    buf = WeightedReservoir(capacity=3, seq_len=1, seed=0, dedup=True)
    buf.add_many(seqs([7, 7, 8]), weights=[1.0, 1.0, 0.0])  # 8 weighs 0: it must never enter
    assert [int(s[0]) for s in buf.items()] == [7] and buf.duplicates == 1


def test_cache_of_smallest_keys_stays_exact_through_many_refills():
    """The cached smallest keys are always the m smallest of all kept keys, so the head is argmin."""
    rng = np.random.default_rng(3)
    buf = WeightedReservoir(capacity=300, seq_len=1, seed=1, domain_weights={"b": 4.0})
    for start in range(0, 30_000, 250):
        buf.add_many(seqs(range(start, start + 250)), list(rng.choice(["a", "b"], size=250)))
        keys = buf.log_keys[: len(buf)]
        low = buf._low_keys
        assert low == sorted(low)
        np.testing.assert_array_equal(low, np.sort(keys)[: len(low)])
        assert [keys[s] for s in buf._low_slots] == low
        if low:
            assert buf._low_slots[0] == int(np.argmin(keys))
