"""Drift detection (daemon/drift.py, daemon/drift_stats.py): the statistics by hand, the window, episodes, state."""

import json
import math
import threading

import numpy as np
import pytest
import safetensors.numpy
from pydantic import ValidationError

from everlearn.daemon.drift import DriftConfig, DriftMonitor
from everlearn.daemon.drift_stats import PageHinkley, TokenWindows, js_divergence, psi, top_changes

pytestmark = pytest.mark.unit

VOCAB = 384  # ByT5: 3 special ids, 256 bytes, 125 extra ids
SMALL = {"reference_tokens": 16384, "window_tokens": 4096, "min_tokens": 2048}

_WORDS = ("the of and to in is that for it as with was on be by this are from at or which an have not can "
         "file system when options command output default value program user line each will used may")
WORDS = _WORDS.split()
PY_LINES = ("def {w}_{i}(self, {w}, key=None):", "    return self._{w}[{i}] + len({w})", "class {W}{i}(Base):",
            "    if {w} is None:", "        raise ValueError(f\"{w}: {{key!r}}\")", "import {w}", "{w} = [{i}, {i}]  # {w}")
_RUSSIAN = "и в не на что он с как это по но из все она так его мы вы было уже когда только"
RUSSIAN = _RUSSIAN.split()


def ids(text: str) -> np.ndarray:
    """The ByT5 encoding: byte b is id b + 3."""
    return np.frombuffer(text.encode(), np.uint8).astype(np.int64) + 3


def english(rng: np.random.Generator, chars: int = 2000) -> np.ndarray:
    out, n = [], 0
    while n < chars:
        words = list(rng.choice(WORDS, rng.integers(5, 15)))
        s = " ".join(words).capitalize() + rng.choice([". ", ", ", ".\n"])
        out.append(s)
        n += len(s)
    return ids("".join(out))


def python_source(rng: np.random.Generator, chars: int = 2000) -> np.ndarray:
    out, n = [], 0
    while n < chars:
        w = str(rng.choice(WORDS))
        s = str(rng.choice(PY_LINES)).format(w=w, W=w.capitalize(), i=int(rng.integers(100))) + "\n"
        out.append(s)
        n += len(s)
    return ids("".join(out))


def russian(rng: np.random.Generator, chars: int = 2000) -> np.ndarray:
    return ids(" ".join(rng.choice(RUSSIAN, chars // 4)) + ".\n")


def random_bytes(rng: np.random.Generator, chars: int = 2000) -> np.ndarray:
    return rng.integers(0, 256, chars) + 3


def feed(monitor: DriftMonitor, docs) -> list:
    """Observe documents one by one and check after each, as the daemon polls: every event it would see."""
    events = []
    for d in docs:
        monitor.observe_tokens(d)
        events += monitor.check()
    return events


def stream(gen, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [gen(rng) for _ in range(n)]


# -- PSI and Jensen-Shannon by hand --------------------------------------------------


def test_psi_without_smoothing_is_the_textbook_sum():
    # p = (.5, .5), q = (.25, .75); the third bin is empty on both sides and left out
    expected = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert psi([2, 2, 0], [1, 3, 0], smoothing=0) == pytest.approx(expected, rel=1e-12)


def test_psi_smooths_bins_empty_on_one_side_and_ignores_bins_empty_on_both():
    # support: the first three bins; + 0.5 each: reference (3.5, 1.5, .5) / 5.5, current (1.5, 1.5, 2.5) / 5.5
    expected = (1.5 - 3.5) / 5.5 * math.log(1.5 / 3.5) + 0 + (2.5 - 0.5) / 5.5 * math.log(2.5 / 0.5)
    assert psi([3, 1, 0, 0], [1, 1, 2, 0]) == pytest.approx(expected, rel=1e-12)
    assert math.isfinite(psi([5, 0], [0, 5]))


def test_identical_shares_give_zero_and_both_statistics_are_symmetric():
    a, b = np.array([10, 30, 60, 0]), np.array([3, 1, 7, 2])
    assert psi(a, 2 * a) == pytest.approx(0, abs=1e-3)  # only the smoothing differs
    assert js_divergence(a, 3 * a) == pytest.approx(0, abs=1e-12)
    assert psi(a, b) == pytest.approx(psi(b, a))
    assert js_divergence(a, b) == pytest.approx(js_divergence(b, a))


def test_js_by_hand_in_bits():
    # p = (.5, .5, 0), q = (0, .5, .5), m = (.25, .5, .25): KL(p||m) = .5 * log2(2) = .5 = KL(q||m)
    assert js_divergence([1, 1, 0], [0, 1, 1]) == pytest.approx(0.5, rel=1e-12)
    assert js_divergence([4, 0], [0, 9]) == 1.0  # disjoint: the maximum in bits
    expected = 0.5 * (0.5 * math.log2(0.5 / 0.375) + 0.5 * math.log2(0.5 / 0.625)) + 0.5 * (0.25 * math.log2(0.25 / 0.375) + 0.75 * math.log2(0.75 / 0.625))
    assert js_divergence([2, 2], [1, 3]) == pytest.approx(expected, rel=1e-12)


def test_js_is_about_psi_over_8_ln_2_for_small_shifts():
    """Why js_threshold 0.05 stands beside psi_threshold 0.25: both ~ chi-square, JS = chi2/8 nats, PSI = chi2."""
    rng = np.random.default_rng(0)
    p = rng.integers(100, 1000, 50) * 1000
    q = p + rng.normal(0, 0.05, 50) * p
    assert js_divergence(p, q) == pytest.approx(psi(p, q, smoothing=0) / (8 * math.log(2)), rel=0.02)


def test_bad_histograms_say_what_is_wrong():
    with pytest.raises(ValueError, match="empty"):
        psi([0, 0], [1, 2])
    with pytest.raises(ValueError, match="one length"):
        js_divergence([1, 2], [1, 2, 3])


def test_top_changes_names_the_ids_that_moved_most():
    assert top_changes(np.array([50, 50, 0, 0]), np.array([50, 20, 30, 0]), k=2) == [(1, 0.5, 0.2), (2, 0.0, 0.3)]


# -- the sliding window ---------------------------------------------------------------


def test_the_first_reference_tokens_are_the_reference_and_never_in_the_window():
    w = TokenWindows(VOCAB, reference_tokens=64, window_tokens=32)  # blocks of 2 tokens
    assert not w.add(np.full(63, 5))
    assert w.pending and w.window_size == 0
    assert w.add(np.array([6, 7, 7]))  # the 64th token completes the reference; 2 more go to the window
    assert w.reference[5] == 63 and w.reference[6] == 1 and w.reference.sum() == 64
    assert w.window_size == 2 and w.current[7] == 2 and w.current.sum() == 2


def test_the_window_slides_and_forgets_old_blocks():
    w = TokenWindows(VOCAB, reference_tokens=64, window_tokens=32)
    w.add(np.full(64, 5))
    w.add(np.full(32, 7))
    assert w.current[7] == 32 and w.window_size == 32
    w.add(np.full(16, 9))  # half the window is new
    assert (w.current[7], w.current[9]) == (16, 16)
    w.add(np.full(33, 9))  # 32 in sealed blocks + 1 in the open one
    assert w.current[7] == 0 and w.current[9] == 33 and w.window_size == 33
    assert w.reference[5] == 64 and w.reference.sum() == 64  # the reference does not move by itself


def test_a_document_longer_than_the_ring_leaves_memory_and_the_window_bounded():
    w = TokenWindows(VOCAB, reference_tokens=64, window_tokens=32)
    w.add(np.full(64, 5))
    w.add(np.concatenate([np.full(10_000, 7), np.full(40, 8)]))
    assert w.ring.shape == (32, VOCAB)
    assert w.window_size == 32 and w.current[8] == 32  # the newest 32 tokens: exactly the 8s
    assert w.history.sum() == 64 and w.history[8] == 40


def test_take_reference_uses_the_newest_tokens_and_empties_the_window():
    w = TokenWindows(VOCAB, reference_tokens=64, window_tokens=32)
    w.add(np.full(64, 5))
    w.add(np.full(65, 9))  # 32 sealed blocks of 9s fill the ring; 1 more 9 in the block being filled
    assert w.take_reference()  # sealing that short block evicts the oldest block (2 tokens)
    assert w.reference[9] == 63 and w.reference[5] == 0 and w.reference.sum() == 63
    assert w.window_size == 0


def test_take_reference_before_anything_was_seen_keeps_collecting():
    w = TokenWindows(VOCAB, reference_tokens=64, window_tokens=32)
    assert not w.take_reference()
    assert w.pending


# -- data drift: events and episodes -----------------------------------------------------------


@pytest.mark.parametrize("other", [random_bytes, russian, python_source])
def test_a_switch_of_content_fires_exactly_one_data_event(other):
    m = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    events = feed(m, stream(english, 30, seed=1))
    assert events == [] and m.stats()["psi"] < 0.1
    events = feed(m, stream(other, 30, seed=2))
    assert len(events) == 1, [e.message for e in events]
    e = events[0]
    assert (e.kind, e.statistic, e.threshold) == ("data", "psi", 0.25) and e.value > 0.25
    assert e.reference_size >= 16384 and 2048 <= e.window_size <= 4096 + 256
    assert "differs from the reference" in e.message and e.top_changes
    assert m.stats()["data_drift"] is True


def test_a_switch_is_found_with_the_default_sizes_and_js_too():
    for statistic in ("psi", "js"):
        m = DriftMonitor(DriftConfig(statistic=statistic), VOCAB)
        assert feed(m, stream(english, 200, seed=3)) == []
        events = feed(m, stream(python_source, 40, seed=4))
        assert [e.statistic for e in events] == [statistic]
        assert events[0].window_size < 32768 + 2048  # 16 sealed blocks and the one being filled


def test_the_same_stream_never_fires():
    m = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    assert feed(m, stream(english, 300, seed=5)) == []
    s = m.stats()
    assert s["psi"] < 0.1 and s["js"] < 0.02 and not s["collecting_reference"] and s["data_events"] == 0


def test_nothing_is_compared_before_min_tokens():
    m = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    text = np.concatenate(stream(english, 10, seed=6))
    m.observe_tokens(text[:16383])
    assert m.stats()["collecting_reference"] and m.stats()["psi"] is None and m.stats()["window_tokens"] == 0
    m.observe_tokens(text[16383:16384])
    assert not m.stats()["collecting_reference"] and m.stats()["reference_tokens"] == 16384
    m.observe_tokens(random_bytes(np.random.default_rng(7), 2047))  # one token short of min_tokens
    assert m.check() == [] and m.stats()["psi"] is None
    m.observe_tokens(random_bytes(np.random.default_rng(7), 1))
    assert len(m.check()) == 1


def test_an_episode_ends_when_the_statistic_falls_back_and_a_new_one_can_start():
    m = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    feed(m, stream(english, 10, seed=8))
    first = feed(m, stream(random_bytes, 10, seed=9))
    back = feed(m, stream(english, 10, seed=10))  # the window is English again: below 0.4 x 0.25
    assert not m.stats()["data_drift"]
    again = feed(m, stream(random_bytes, 10, seed=11))
    assert (len(first), len(back), len(again)) == (1, 0, 1)


def test_refresh_makes_the_new_content_the_reference():
    m = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    feed(m, stream(english, 10, seed=12))
    assert len(feed(m, stream(python_source, 10, seed=13))) == 1
    m.refresh()  # a promotion: serving learned the Python
    s = m.stats()
    assert not s["data_drift"] and s["psi"] is None and s["refreshes"] == 1  # the window starts empty
    assert feed(m, stream(python_source, 20, seed=14)) == []
    assert len(feed(m, stream(english, 10, seed=15))) == 1  # and English is now the change


def test_tokens_outside_the_vocabulary_are_refused_with_what_to_do():
    m = DriftMonitor(DriftConfig(**SMALL), 259)
    with pytest.raises(ValueError, match=r"outside the vocabulary of 259.*tokenizer's vocab_size"):
        m.observe_tokens(np.array([3, 300]))
    with pytest.raises(ValueError, match="not integer ids"):
        m.observe_tokens(np.array([3.0, 4.0]))
    with pytest.raises(ValueError, match="at least 2 ids"):
        DriftMonitor(DriftConfig(), 1)


def test_disabled_monitor_does_nothing():
    m = DriftMonitor(DriftConfig(enabled=False, **SMALL), VOCAB)
    feed(m, stream(english, 10, seed=16) + stream(random_bytes, 10, seed=17))
    m.observe_losses([1.0] * 50 + [9.0] * 50)
    assert m.check() == [] and m.stats()["reference_tokens"] == 0 and m.stats()["losses"] == 0


def test_config_sizes_must_fit_together():
    with pytest.raises(ValidationError, match="exceeds drift.reference_tokens"):
        DriftConfig(reference_tokens=1024, window_tokens=2048)
    with pytest.raises(ValidationError, match="never hold enough"):
        DriftConfig(window_tokens=1024, min_tokens=2048)
    with pytest.raises(ValidationError, match="extra"):
        DriftConfig(threshold=0.3)
    assert DriftConfig().response.lr_scale == 1.0


def test_observing_from_one_thread_while_another_checks_keeps_the_counts_whole():
    m = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    docs = stream(english, 40, seed=18)
    t = threading.Thread(target=lambda: [m.observe_tokens(d) for d in docs])
    t.start()
    while t.is_alive():
        m.check(), m.stats(), m.state_dict()
    t.join()
    w = m.tokens
    expected_window = sum(w.ring[(w.head - k) % w.capacity] for k in range(1, min(w.since, w.window_blocks) + 1))
    assert np.array_equal(w.window, expected_window)
    assert int(w.history.sum()) == int(w.ring.sum()) == int(w.sizes.sum()) == 16384  # a full ring of whole blocks
    assert int(w.reference.sum()) == 16384 and int(w.history.sum()) + w.open_n + 16384 <= sum(len(d) for d in docs)


# -- Page-Hinkley -------------------------------------------------------------------------------


def test_page_hinkley_matches_hand_computed_values():
    # delta 0.1; x = 1 1 1 3 3: running means 1 1 1 1.5 1.8, m_t = -.1 -.2 -.3 1.1 2.2, min -.3
    ph = PageHinkley(delta=0.1, threshold=100, min_samples=1)
    got = []
    for x in (1, 1, 1, 3, 3):
        assert ph.update(x) is None
        got.append(ph.statistic_up)
    assert got == pytest.approx([0, 0, 0, 1.4, 2.5])
    assert ph.statistic_down == pytest.approx(0)  # u_t = .1 .2 .3 1.9 3.2 only rose


def test_page_hinkley_fires_strictly_above_lambda_and_starts_over():
    assert [PageHinkley(0.1, 2.5, 1).update(x) for x in (1, 1, 1, 3, 3)][-1] is None  # 2.5 is not > 2.5
    ph = PageHinkley(0.1, 2.4, 1)
    found = [ph.update(x) for x in (1, 1, 1, 3, 3)]
    assert found[:4] == [None] * 4
    assert found[4] == ("up", pytest.approx(2.5), 5)
    assert ph.n == 0 and ph.statistic_up == 0  # reset: the new level is learned, no repeat


def test_page_hinkley_two_sided_finds_a_fall_by_the_mirror_values():
    ph = PageHinkley(0.1, 100, 1, two_sided=True)
    for x in (3, 3, 3, 1, 1):
        ph.update(x)
    assert ph.statistic_down == pytest.approx(2.5) and ph.statistic_up == pytest.approx(0)
    assert PageHinkley(0.1, 2.4, 1, two_sided=True).update(3) is None
    one_sided = PageHinkley(0.1, 2.4, 1)
    assert [one_sided.update(x) for x in (3, 3, 3, 1, 1)] == [None] * 5


def test_page_hinkley_waits_for_min_samples():
    ph = PageHinkley(0.1, 2.4, min_samples=6)
    assert [ph.update(x) for x in (1, 1, 1, 3, 3)] == [None] * 5
    assert ph.update(3) is not None  # the statistic is above lambda and 6 samples were seen


def test_page_hinkley_detects_a_step_after_the_expected_number_of_samples():
    """50 losses at 1.0, then 2.0: after k of them PH_k = sum_{j<=k} (50 / (50 + j) - delta) (dev = 2 - mean)."""
    delta, lam = 0.1, 10.0
    total, expected = 0.0, 0
    while total <= lam:
        expected += 1
        total += 50 / (50 + expected) - delta
    ph = PageHinkley(delta, lam, 30)
    assert all(ph.update(1.0) is None for _ in range(50))
    k = next(i for i in range(1, 1000) if ph.update(2.0))
    assert k == expected == 13


def test_page_hinkley_defaults_find_a_noisy_rise_and_stay_quiet_on_stationary_noise():
    cfg = DriftConfig()
    rng = np.random.default_rng(20)
    ph = PageHinkley(cfg.ph_delta, cfg.ph_lambda, cfg.ph_min_samples)
    assert not any(ph.update(x) for x in rng.normal(2.0, 0.3, 20_000))
    ph.reset()
    assert not any(ph.update(x) for x in rng.normal(2.0, 0.3, 200))
    k = next(i for i, x in enumerate(rng.normal(2.5, 0.3, 500), 1) if ph.update(x))
    assert 10 <= k <= 60  # lambda / (0.5 - delta) = 25, plus the mean catching up


def test_loss_events_reach_check_once_and_non_finite_losses_are_skipped():
    m = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    m.observe_losses([1.0] * 50 + [math.nan, math.inf])
    assert m.check() == []
    m.observe_losses([2.0] * 20)
    events = m.check()
    assert [(e.kind, e.statistic, e.window_size) for e in events] == [("loss", "page_hinkley_up", 63)]  # 50 + 13, as above
    assert "ph_lambda=10.0" in events[0].message and m.check() == []
    s = m.stats()
    assert (s["losses"], s["losses_skipped"], s["loss_events"]) == (70, 2, 1)


def test_refresh_restarts_the_loss_test():
    m = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    m.observe_losses([1.0] * 40 + [1.5] * 5)
    m.refresh()
    assert m.stats()["loss_samples"] == 0 and m.stats()["page_hinkley"] == 0


# -- state ----------------------------------------------------------------------------------------


def through_checkpoint(state: dict) -> dict:
    """What the run checkpoint does: arrays through safetensors, meta through JSON."""
    arrays = safetensors.numpy.load(safetensors.numpy.save(state["arrays"]))
    return {"arrays": arrays, "meta": json.loads(json.dumps(state["meta"]))}


def test_state_round_trip_preserves_every_later_decision():
    cfg = DriftConfig(**SMALL)
    a = DriftMonitor(cfg, VOCAB)
    feed(a, stream(english, 12, seed=21) + stream(random_bytes, 3, seed=22))  # mid-episode, mid-block
    a.observe_losses(list(np.random.default_rng(23).normal(1.0, 0.2, 40)))
    b = DriftMonitor(cfg, VOCAB)
    b.load_state_dict(through_checkpoint(a.state_dict()))
    assert b.stats() == a.stats()
    later = stream(random_bytes, 5, seed=24) + stream(english, 10, seed=25) + stream(python_source, 10, seed=26)
    losses = [1.0] * 10 + [2.0] * 30
    a.observe_losses(losses), b.observe_losses(losses)
    assert feed(a, later) == feed(b, later)
    assert b.stats() == a.stats() and b.stats()["data_events"] == 2 and b.stats()["loss_events"] == 1


def test_a_fresh_state_round_trips_too():
    cfg = DriftConfig(**SMALL)
    fresh = DriftMonitor(cfg, VOCAB)
    state = through_checkpoint(fresh.state_dict())
    assert state["meta"]["page_hinkley"]["min_up"] is None  # infinity is not JSON
    b = DriftMonitor(cfg, VOCAB)
    b.load_state_dict(state)
    assert b.stats() == fresh.stats() and b.ph.min_up == math.inf


def test_other_window_sizes_keep_the_reference_and_refill_the_window():
    a = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    feed(a, stream(english, 12, seed=27))
    b = DriftMonitor(DriftConfig(reference_tokens=16384, window_tokens=8192, min_tokens=2048), VOCAB)
    b.load_state_dict(through_checkpoint(a.state_dict()))
    assert np.array_equal(b.tokens.reference, a.tokens.reference) and b.tokens.window_size == 0


def test_bad_states_are_refused_clearly_and_leave_the_monitor_as_it_was():
    a = DriftMonitor(DriftConfig(**SMALL), VOCAB)
    feed(a, stream(english, 12, seed=28))
    before = a.stats()
    good = a.state_dict()
    with pytest.raises(ValueError, match="counts 259 token ids, this run's tokenizer has 384"):
        a.load_state_dict({"arrays": good["arrays"], "meta": {**good["meta"], "vocab_size": 259}})
    with pytest.raises(ValueError, match="version 99, this build reads 1"):
        a.load_state_dict({"arrays": good["arrays"], "meta": {**good["meta"], "version": 99}})
    with pytest.raises(ValueError, match="no arrays/meta"):
        a.load_state_dict({"reference": []})
    damaged = {**good["arrays"], "sizes": good["arrays"]["sizes"] + 1}
    with pytest.raises(ValueError, match="damaged"):
        a.load_state_dict({"arrays": damaged, "meta": good["meta"]})
    with pytest.raises(ValueError, match="lacks 'page_hinkley'"):
        a.load_state_dict({"arrays": good["arrays"], "meta": {k: v for k, v in good["meta"].items() if k != "page_hinkley"}})
    with pytest.raises(ValueError, match="Page-Hinkley state is malformed"):
        a.load_state_dict({"arrays": good["arrays"], "meta": {**good["meta"], "page_hinkley": {"n": 1}}})
    assert a.stats() == before
