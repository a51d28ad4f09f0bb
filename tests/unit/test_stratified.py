"""StratifiedReservoir: quotas hold as domains appear; each stratum is uniform over its domain."""

import numpy as np
import pytest

from everlearn.buffers import StratifiedReservoir
from everlearn.buffers.reservoir import AdmissionPlan
from everlearn.buffers.stratified import quotas_for

pytestmark = pytest.mark.unit


def seqs(values):
    return [np.full(1, v, dtype=np.int32) for v in values]


def test_quotas_hold_as_new_domains_appear():
    buf = StratifiedReservoir(capacity=12, seq_len=1, seed=0)
    buf.add_many(seqs(range(100)), ["a"] * 100)
    assert buf.domain_counts() == {"a": 12}
    buf.add_many(seqs(range(100, 150)), ["b"] * 50)  # a late domain gets its share at once
    assert buf.domain_counts() == {"a": 6, "b": 6}
    buf.add_many(seqs(range(150, 153)), ["c"] * 3)  # a small domain keeps all it has, the rest stays free
    assert buf.domain_counts() == {"a": 4, "b": 4, "c": 3}
    assert buf.quotas == [4, 4, 4] and len(buf) == 11


def test_configured_shares():
    buf = StratifiedReservoir(capacity=10, seq_len=1, seed=0, domain_weights={"code": 4.0})
    buf.add_many(seqs(range(200)), ["code", "prose"] * 100)
    assert buf.domain_counts() == {"code": 8, "prose": 2}


def test_each_stratum_is_uniform_over_its_domain_even_after_thinning():
    n_a, n_b, cap, trials = 40, 30, 8, 3000
    counts = np.zeros(n_a + n_b)
    for seed in range(trials):
        buf = StratifiedReservoir(capacity=cap, seq_len=1, seed=seed)
        buf.add_many(seqs(range(n_a)), ["a"] * n_a)  # stratum a fills the whole buffer first
        buf.add_many(seqs(range(n_a, n_a + n_b)), ["b"] * n_b)  # then is thinned to 4
        for s in buf.items():
            counts[int(s[0])] += 1
    for lo, hi in ((0, n_a), (n_a, n_a + n_b)):
        p = (cap / 2) / (hi - lo)
        expected = trials * p
        z = (counts[lo:hi] - expected) / np.sqrt(trials * p * (1 - p))
        assert np.all(np.abs(z) < 4.5), counts[lo:hi]
        # no bias by position: early half vs late half of the domain's stream
        half = (hi - lo) // 2
        assert abs(counts[lo : lo + half].sum() - counts[lo + half : hi].sum()) < 0.1 * counts[lo:hi].sum()


def check_layout(buf: StratifiedReservoir) -> None:
    """Kept items packed in 0..len-1; every slot in exactly one stratum, at its rank, of its domain."""
    seen_slots = []
    for d, members in enumerate(buf.members):
        assert len(members) <= buf.quotas[d]
        for r, slot in enumerate(members):
            assert buf.slots.domain_ids[slot] == d and buf._rank[slot] == r
        seen_slots += members
    assert sorted(seen_slots) == list(range(len(buf)))
    if buf.dedup:
        assert buf._kept == {int(buf.slots.hashes[s]): s for s in range(len(buf))}


@pytest.mark.parametrize("dedup", [False, True])
def test_layout_holds_through_late_domains_and_thinning(dedup, monkeypatch):
    monkeypatch.setattr(AdmissionPlan, "BLOCK", 3)  # plans run out inside batches
    rng = np.random.default_rng(7)
    buf = StratifiedReservoir(capacity=17, seq_len=2, seed=3, dedup=dedup, domain_weights={"d2": 3.0})
    names = ["d0"]
    for step in range(120):
        if step in (10, 30, 31, 70):  # domains appear late, one of them twice in a row
            names.append(f"d{len(names)}")
        n = int(rng.integers(0, 12))
        values = rng.integers(0, 60 if dedup else 10**6, size=n)
        buf.add_many([np.array([v, v % 7], np.int32) for v in values], list(rng.choice(names, size=n)))
        check_layout(buf)
    assert sum(buf.quotas) == 17 and buf.quotas[2] > buf.quotas[1]


def test_quotas_of_known_domains_never_grow():
    old = quotas_for([1, 1, 1], 10)
    assert old == [4, 3, 3]
    for extra in (0.01, 0.4, 1.0, 5.0):
        new = quotas_for([1, 1, 1, extra], 10, old)
        assert all(n <= o for n, o in zip(new, old, strict=False)) and sum(new) == 10
    # rounding would give the second domain 3 -> 3 and the newcomer the slack
    assert quotas_for([1, 1, 1, 0.01], 10, [4, 3, 3]) == [4, 3, 3, 0]
    assert quotas_for([1, 1], 3, [3]) == [2, 1]


def test_each_stratum_is_uniform_in_small_batches_across_plan_blocks(monkeypatch):
    """Chi-square per stratum (corrected for the fixed stratum size) with plans of 2 and batches of 3."""
    from tests.unit.test_reservoir import chi2_critical

    monkeypatch.setattr(AdmissionPlan, "BLOCK", 2)
    n_a, n_b, cap, trials = 30, 24, 6, 3000
    counts = np.zeros(n_a + n_b)
    for seed in range(trials):
        buf = StratifiedReservoir(capacity=cap, seq_len=1, seed=seed)
        # a's first 12 fill the buffer; then b appears and a and b interleave
        order = [("a", i) for i in range(12)] + [
            x for pair in zip([("b", n_a + j) for j in range(n_b)], [("a", 12 + j) for j in range(n_a - 12)] + [None] * 6, strict=True)
            for x in pair if x is not None
        ]
        for i in range(0, len(order), 3):
            chunk = order[i : i + 3]
            buf.add_many(seqs([v for _, v in chunk]), [d for d, _ in chunk])
        for s in buf.items():
            counts[int(s[0])] += 1
    for lo, hi in ((0, n_a), (n_a, n_a + n_b)):
        n, k = hi - lo, cap // 2
        expected = trials * k / n
        x2 = float(((counts[lo:hi] - expected) ** 2).sum() / expected) * (n - 1) / (n - k)
        assert x2 < chi2_critical(n - 1), (lo, x2, counts[lo:hi])


def test_a_state_from_before_plans_still_loads_and_keeps_sampling_uniformly():
    buf = StratifiedReservoir(capacity=8, seq_len=1, seed=1)
    buf.add_many(seqs(range(100)), ["a", "b"] * 50)
    state = buf.state_dict()
    del state["arrays"]["rank"]
    state["meta"].pop("plans")
    old = StratifiedReservoir(capacity=8, seq_len=1, seed=1)
    old.load_state_dict(state)
    check_layout(old)
    old.add_many(seqs(range(100, 300)), ["a", "b"] * 100)
    check_layout(old)
    assert old.domain_counts() == {"a": 4, "b": 4}
    assert sum(int(s[0]) >= 100 for s in old.items()) > 0  # the strata still admit
