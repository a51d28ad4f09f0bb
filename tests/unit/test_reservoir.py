"""UniformReservoir (buffers/reservoir.py): bounds, padding, state, determinism, uniformity."""

import json
import math

import numpy as np
import pytest

from everlearn.buffers import ReplayBuffer, UniformReservoir
from everlearn.buffers.reservoir import AdmissionPlan
from everlearn.buffers.storage import PAD_ID

pytestmark = pytest.mark.unit


def seqs(values, length=1):
    """One int32 sequence of ``length`` copies per value (value identifies the item)."""
    return [np.full(length, v, dtype=np.int32) for v in values]


# -- bounds and basics --------------------------------------------------------


def test_satisfies_the_replay_buffer_protocol():
    assert isinstance(UniformReservoir(capacity=4, seq_len=8), ReplayBuffer)


@pytest.mark.parametrize("capacity, seq_len", [(0, 8), (4, 0), (-1, 8)])
def test_rejects_non_positive_sizes(capacity, seq_len):
    with pytest.raises(ValueError):
        UniformReservoir(capacity=capacity, seq_len=seq_len)


def test_len_bounded_by_capacity_and_seen_counts_every_offer():
    buf = UniformReservoir(capacity=7, seq_len=4, seed=3)
    offered = 0
    for chunk in (1, 2, 3, 5, 10, 40):
        buf.add_many(seqs(range(offered, offered + chunk)))
        offered += chunk
        assert buf.seen == offered
        assert len(buf) == min(offered, 7)
        # every kept item is one that was offered, and no item is kept twice
        kept = [int(s[0]) for s in buf.items()]
        assert len(set(kept)) == len(kept)
        assert all(0 <= v < offered for v in kept)


def test_fills_in_stream_order_before_capacity_is_reached():
    buf = UniformReservoir(capacity=5, seq_len=4)
    buf.add_many(seqs([10, 11, 12]))
    assert [int(s[0]) for s in buf.items()] == [10, 11, 12]


def test_capacity_one():
    buf = UniformReservoir(capacity=1, seq_len=2, seed=1)
    for i in range(100):
        buf.add_many(seqs([i]))
        assert len(buf) == 1
        assert buf.seen == i + 1
    assert buf.sample(3).shape == (3, 2)
    # with capacity 1 every sample is the one kept item
    kept = buf.items()[0]
    assert (buf.sample(5)[:, : len(kept)] == kept).all()


def test_capacity_one_keeps_each_item_with_probability_one_over_n():
    n, trials = 10, 4000
    counts = np.zeros(n)
    for seed in range(trials):
        buf = UniformReservoir(capacity=1, seq_len=1, seed=seed)
        buf.add_many(seqs(range(n)))
        counts[int(buf.items()[0][0])] += 1
    # binomial(4000, 0.1): mean 400, sd 19; 5 sd is far beyond chance
    assert np.all(np.abs(counts - trials / n) < 5 * math.sqrt(trials * 0.1 * 0.9))


@pytest.mark.parametrize("method", ["sample", "sample_with_lengths"])
def test_sampling_an_empty_buffer_raises(method):
    buf = UniformReservoir(capacity=3, seq_len=4)
    with pytest.raises(ValueError):
        getattr(buf, method)(1)


def test_sequence_longer_than_seq_len_is_rejected():
    buf = UniformReservoir(capacity=3, seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        buf.add_many([np.arange(5, dtype=np.int32)])
    assert len(buf) == 0
    assert buf.seen == 0
    buf.add_many([np.arange(4, dtype=np.int32)])  # exactly seq_len is fine
    assert len(buf) == 1


def test_domains_must_match_items():
    buf = UniformReservoir(capacity=3, seq_len=4)
    with pytest.raises(ValueError):
        buf.add_many(seqs([1, 2]), domains=["a"])


def test_padding_and_lengths():
    buf = UniformReservoir(capacity=4, seq_len=6)
    items = [
        np.array([7, 8, 9], dtype=np.int32),
        np.array([], dtype=np.int32),
        np.array([1, 2, 3, 4, 5, 6], dtype=np.int32),
        np.array([42], dtype=np.int32),
    ]
    buf.add_many(items)
    expected = np.array(
        [
            [7, 8, 9, PAD_ID, PAD_ID, PAD_ID],
            [PAD_ID] * 6,
            [1, 2, 3, 4, 5, 6],
            [42, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID],
        ],
        dtype=np.int32,
    )
    np.testing.assert_array_equal(buf.slots.tokens, expected)
    np.testing.assert_array_equal(buf.slots.lengths, [3, 0, 6, 1])
    for got, want in zip(buf.items(), items, strict=True):
        np.testing.assert_array_equal(got, want)
    # sample_with_lengths pairs every row with its own true length
    rows, lengths = buf.sample_with_lengths(64, np.random.default_rng(0))
    assert rows.shape == (64, 6) and rows.dtype == np.int32
    assert lengths.shape == (64,)
    for row, n in zip(rows, lengths, strict=True):
        i = next(i for i, it in enumerate(items) if len(it) == n)
        np.testing.assert_array_equal(row, expected[i])


def test_replacing_a_long_item_with_a_short_one_clears_the_old_tail():
    buf = UniformReservoir(capacity=1, seq_len=5, seed=0)
    buf.add_many([np.array([9, 9, 9, 9, 9], dtype=np.int32)])
    # keep offering short items until one replaces the long one
    i = 0
    while buf.slots.lengths[0] == 5:
        buf.add_many([np.array([i + 100], dtype=np.int32)])
        i += 1
    assert 100 <= buf.slots.tokens[0, 0] < 100 + i
    np.testing.assert_array_equal(buf.slots.tokens[0, 1:], [PAD_ID] * 4)
    assert buf.slots.lengths[0] == 1


def test_sample_returns_copies():
    buf = UniformReservoir(capacity=2, seq_len=3)
    buf.add_many(seqs([5, 6], length=3))
    s = buf.sample(4)
    s[:] = -1
    assert set(buf.slots.tokens.ravel().tolist()) == {5, 6}


def test_sample_draws_uniformly_over_kept_items():
    buf = UniformReservoir(capacity=5, seq_len=1)
    buf.add_many(seqs(range(5)))
    draws = buf.sample(10000, np.random.default_rng(1))[:, 0]
    counts = np.bincount(draws, minlength=5)
    # binomial(10000, 0.2): sd 40
    assert np.all(np.abs(counts - 2000) < 200)


def test_domain_counts():
    buf = UniformReservoir(capacity=10, seq_len=2)
    assert buf.domain_counts() == {}
    buf.add_many(seqs(range(6)), domains=["news", "code", "news", "web", "news", "code"])
    assert buf.domain_counts() == {"news": 3, "code": 2, "web": 1}
    buf.add_many(seqs([6]))  # no domains -> ""
    assert buf.domain_counts() == {"news": 3, "code": 2, "web": 1, "": 1}


def test_domain_counts_after_eviction_match_kept_items():
    buf = UniformReservoir(capacity=8, seq_len=1, seed=5)
    values = list(range(200))
    domains = ["even" if v % 2 == 0 else "odd" for v in values]
    buf.add_many(seqs(values), domains=domains)
    kept = [int(s[0]) for s in buf.items()]
    expected = {"even": sum(v % 2 == 0 for v in kept), "odd": sum(v % 2 == 1 for v in kept)}
    got = {k: v for k, v in buf.domain_counts().items() if v}
    assert got == {k: v for k, v in expected.items() if v}
    assert sum(buf.domain_counts().values()) == len(buf) == 8


# -- determinism and state ----------------------------------------------------


def test_same_seed_same_reservoir_and_samples():
    a = UniformReservoir(capacity=6, seq_len=3, seed=11)
    b = UniformReservoir(capacity=6, seq_len=3, seed=11)
    for buf in (a, b):
        buf.add_many(seqs(range(100), length=2))
    np.testing.assert_array_equal(a.slots.tokens, b.slots.tokens)
    np.testing.assert_array_equal(a.sample(20), b.sample(20))


def test_different_seed_different_reservoir():
    kept = set()
    for seed in range(5):
        buf = UniformReservoir(capacity=6, seq_len=1, seed=seed)
        buf.add_many(seqs(range(200)))
        kept.add(tuple(sorted(int(s[0]) for s in buf.items())))
    assert len(kept) > 1


def _filled(seed=2):
    buf = UniformReservoir(capacity=8, seq_len=5, seed=seed)
    rng = np.random.default_rng(123)
    items = [rng.integers(3, 259, size=rng.integers(1, 6)).astype(np.int32) for _ in range(40)]
    doms = [f"d{i % 3}" for i in range(40)]
    buf.add_many(items, doms)
    return buf


def _future(buf):
    """Drive a buffer on: admissions, samples, and draws of the buffer's own rng."""
    rng = np.random.default_rng(77)
    trace = []
    for _ in range(5):
        items = [rng.integers(3, 259, size=rng.integers(1, buf.seq_len + 1)).astype(np.int32) for _ in range(30)]
        buf.add_many(items, ["late"] * len(items))
        trace.append(buf.slots.tokens.copy())
        trace.append(buf.slots.lengths.copy())
        trace.append(buf.sample(7))
        trace.extend(buf.sample_with_lengths(3))
    trace.append(np.array(json.dumps(sorted(buf.domain_counts().items()))))
    return trace


def test_state_dict_round_trip_identical_arrays_and_future():
    src = _filled()
    state = src.state_dict()
    # the state survives being stored: arrays as arrays, meta through JSON
    state = {"arrays": {k: v.copy() for k, v in state["arrays"].items()}, "meta": json.loads(json.dumps(state["meta"]))}

    dst = UniformReservoir(capacity=8, seq_len=5, seed=999)  # seed must not matter: the rng state is restored
    dst.add_many(seqs(range(3), length=5), ["other"] * 3)  # and whatever it held before is replaced
    dst.load_state_dict(state)

    assert len(dst) == len(src) and dst.seen == src.seen
    np.testing.assert_array_equal(dst.slots.tokens, src.slots.tokens)
    np.testing.assert_array_equal(dst.slots.lengths, src.slots.lengths)
    np.testing.assert_array_equal(dst.slots.domain_ids, src.slots.domain_ids)
    assert dst.slots.domains == src.slots.domains
    assert dst.domain_counts() == src.domain_counts()

    for got, want in zip(_future(dst), _future(src), strict=True):
        np.testing.assert_array_equal(got, want)


def test_state_dict_of_partly_filled_buffer():
    src = UniformReservoir(capacity=10, seq_len=4, seed=1)
    src.add_many(seqs([1, 2, 3], length=2))
    dst = UniformReservoir(capacity=10, seq_len=4, seed=1)
    dst.add_many(seqs(range(10), length=4))
    dst.load_state_dict(src.state_dict())
    assert len(dst) == 3 and dst.seen == 3
    np.testing.assert_array_equal(dst.slots.tokens, src.slots.tokens)  # slots beyond size are pad again
    for got, want in zip(_future(dst), _future(src), strict=True):
        np.testing.assert_array_equal(got, want)


def test_state_dict_is_a_snapshot():
    buf = _filled()
    state = buf.state_dict()
    tokens = state["arrays"]["tokens"].copy()
    rng_state = json.dumps(state["meta"]["rng"])
    buf.add_many(seqs(range(50), length=5))
    buf.sample(10)
    np.testing.assert_array_equal(state["arrays"]["tokens"], tokens)
    assert json.dumps(state["meta"]["rng"]) == rng_state
    assert state["meta"]["seen"] == 40


def test_restore_in_the_middle_of_a_plan_block(monkeypatch):
    monkeypatch.setattr(AdmissionPlan, "BLOCK", 5)
    src = UniformReservoir(capacity=3, seq_len=1, seed=4)
    src.add_many(seqs(range(50)))
    assert src._plan.i not in (0, 5)  # stopped inside a block, so the restore must replan it and skip ahead
    dst = UniformReservoir(capacity=3, seq_len=1, seed=8)
    dst.load_state_dict(json.loads(json.dumps({"arrays": {}, "meta": src.state_dict()["meta"]})) | {"arrays": src.state_dict()["arrays"]})
    for start in range(50, 5000, 97):
        for buf in (src, dst):
            buf.add_many(seqs(range(start, start + 97)))
        assert [int(s[0]) for s in src.items()] == [int(s[0]) for s in dst.items()]


def test_state_without_plan_restarts_w_from_its_law():
    """A full reservoir whose state lacks Algorithm L's variables still admits at the k/n rate."""
    k, n, trials = 4, 400, 300
    admitted = 0
    for seed in range(trials):
        buf = UniformReservoir(capacity=k, seq_len=1, seed=seed)
        buf.add_many(seqs(range(n)))
        state = buf.state_dict()
        state["meta"].pop("plan")
        restored = UniformReservoir(capacity=k, seq_len=1, seed=seed)
        restored.load_state_dict(state)
        restored.add_many(seqs(range(n, 2 * n)))
        admitted += sum(int(s[0]) >= n for s in restored.items())
    # each of the k slots holds a late item with probability 1/2 (n of 2n items): mean k/2 per trial
    mean, sd = trials * k / 2, math.sqrt(trials * k * 0.25 * (2 * n - k) / (2 * n - 1))
    assert abs(admitted - mean) < 4 * sd, (admitted, mean)


def test_admissions_of_one_batch_to_the_same_slot_keep_the_last():
    """Plans of 1 admission with k = 1: many admissions fall in one batch, the latest must win."""
    for seed in range(20):
        one = UniformReservoir(capacity=1, seq_len=1, seed=seed)
        one.add_many(seqs(range(300)))
        steps = UniformReservoir(capacity=1, seq_len=1, seed=seed)
        for v in range(300):
            steps.add_many(seqs([v]))
        assert one.items()[0][0] == steps.items()[0][0]


def test_load_state_dict_rejects_wrong_shape():
    state = _filled().state_dict()
    with pytest.raises(ValueError):
        UniformReservoir(capacity=8, seq_len=6).load_state_dict(state)
    with pytest.raises(ValueError):
        UniformReservoir(capacity=4, seq_len=5).load_state_dict(state)


# -- uniformity ---------------------------------------------------------------
#
# After a stream of N items into a reservoir of k, every item must be kept with
# probability k/N. Over T independent seeded trials the inclusion count c_i of
# item i has mean E = T k / N. Because exactly k items are kept per trial, the
# counts are multivariate hypergeometric-like: Var(c_i) = T p (1 - p) with
# p = k/N and Cov(c_i, c_j) = -T p (1 - p) / (N - 1), i.e. the covariance is
# T p (1 - p) N / (N - 1) (I - 11'/N). Pearson's X^2 = sum (c_i - E)^2 / E
# therefore has mean N (1 - p), and
#     X^2 * (N - 1) / (N (1 - p)) = X^2 * (N - 1) / (N - k)
# is asymptotically chi^2 with N - 1 degrees of freedom. (This is the
# "X^2 / (1 - k/N)" correction with the exact N/(N-1) factor of the sum
# constraint; dropping that factor would inflate the statistic by ~2.5 %.)

Z_999 = 3.090232306167813  # standard normal quantile at 0.999 (one-sided)


def chi2_critical(df: int, z: float = Z_999) -> float:
    """Upper quantile of chi^2(df) by Wilson-Hilferty: df (1 - 2/(9df) + z sqrt(2/(9df)))^3.

    For df = 39 and z = z_0.999 this gives 72.15; tables give chi2.ppf(0.999, 39) = 72.05.
    """
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def test_wilson_hilferty_matches_tabulated_quantiles():
    # chi2.ppf(0.999, df) from standard tables
    for df, table in ((10, 29.588), (39, 72.055), (49, 85.351), (99, 148.230)):
        assert abs(chi2_critical(df) - table) / table < 0.01


N_ITEMS, K, TRIALS = 40, 8, 5000


def reservoir_inclusions(admit) -> np.ndarray:
    """(TRIALS, N) 0/1 matrix: was item i kept in trial t; ``admit(seed, items)`` returns kept ids."""
    out = np.zeros((TRIALS, N_ITEMS), dtype=np.int64)
    for t in range(TRIALS):
        out[t, admit(t)] = 1
    return out


def admit_everlearn(seed: int) -> list[int]:
    buf = UniformReservoir(capacity=K, seq_len=1, seed=seed)
    # offered in two calls: the admission state must carry across add_many calls
    buf.add_many(seqs(range(N_ITEMS // 2)))
    buf.add_many(seqs(range(N_ITEMS // 2, N_ITEMS)))
    return [int(s[0]) for s in buf.items()]


def admit_reference_r(seed: int, off_by_one: bool) -> list[int]:
    """Algorithm R written out; ``off_by_one`` keeps item t with k/t instead of k/(t+1) (a known bug)."""
    rng = np.random.default_rng(seed)
    res: list[int] = []
    for t in range(N_ITEMS):
        if len(res) < K:
            res.append(t)
            continue
        j = int(rng.integers(0, t if off_by_one else t + 1))
        if j < K:
            res[j] = t
    return res


def uniformity_statistic(inclusions: np.ndarray) -> float:
    trials, n = inclusions.shape
    k = int(inclusions[0].sum())
    assert (inclusions.sum(axis=1) == k).all()
    counts = inclusions.sum(axis=0)
    expected = trials * k / n
    x2 = float(((counts - expected) ** 2).sum() / expected)
    return x2 * (n - 1) / (n - k)


def early_late_z(inclusions: np.ndarray) -> float:
    """z of the items kept from the first half of the stream vs the uniform expectation k/2.

    Per trial that count is hypergeometric(N, N/2, k): mean k/2, var k/4 (N-k)/(N-1).
    """
    trials, n = inclusions.shape
    k = int(inclusions[0].sum())
    early = inclusions[:, : n // 2].sum()
    var = trials * k * 0.25 * (n - k) / (n - 1)
    return float((early - trials * k / 2) / math.sqrt(var))


def is_uniform(inclusions: np.ndarray) -> bool:
    chi_ok = uniformity_statistic(inclusions) < chi2_critical(inclusions.shape[1] - 1)
    z_ok = abs(early_late_z(inclusions)) < 3.2905  # two-sided 0.001
    return chi_ok and z_ok


@pytest.fixture(scope="module", params=[AdmissionPlan.BLOCK, 2], ids=["block-1024", "block-2"])
def everlearn_inclusions(request):
    """Inclusions with the real plan size, and with plans of 2 so that every batch crosses blocks."""
    saved = AdmissionPlan.BLOCK
    AdmissionPlan.BLOCK = request.param
    try:
        return reservoir_inclusions(admit_everlearn)
    finally:
        AdmissionPlan.BLOCK = saved


def test_inclusion_counts_pass_chi_square(everlearn_inclusions):
    stat = uniformity_statistic(everlearn_inclusions)
    assert stat < chi2_critical(N_ITEMS - 1), stat


def test_early_and_late_items_equally_likely(everlearn_inclusions):
    assert abs(early_late_z(everlearn_inclusions)) < 3.2905
    # and in plain numbers: the first and second half each hold ~k/2 per trial
    early = everlearn_inclusions[:, : N_ITEMS // 2].sum(axis=1).mean()
    assert abs(early - K / 2) < 0.1


def test_every_position_is_kept_with_probability_k_over_n(everlearn_inclusions):
    p = everlearn_inclusions.mean(axis=0)
    sd = math.sqrt(K / N_ITEMS * (1 - K / N_ITEMS) / TRIALS)
    assert np.all(np.abs(p - K / N_ITEMS) < 4.5 * sd)


def test_uniformity_check_accepts_correct_reference_and_rejects_off_by_one():
    correct = reservoir_inclusions(lambda s: admit_reference_r(s, off_by_one=False))
    buggy = reservoir_inclusions(lambda s: admit_reference_r(s, off_by_one=True))
    assert is_uniform(correct)
    # k/t keeps the first k items with (k-1)/(N-1), every later one with k/(N-1):
    # the check must see that
    assert uniformity_statistic(buggy) > chi2_critical(N_ITEMS - 1)
    assert early_late_z(buggy) < -3.2905
    assert not is_uniform(buggy)
