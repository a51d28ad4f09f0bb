"""StratifiedReservoir: quotas hold as domains appear; each stratum is uniform over its domain."""

import numpy as np
import pytest

from everlearn.buffers import StratifiedReservoir

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
