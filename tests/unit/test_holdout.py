"""daemon/holdout.py: which documents are held out, and the fresh / old evaluation windows."""

import hashlib
import json
import math

import numpy as np
import pytest

from everlearn.daemon.holdout import HoldoutConfig, HoldoutWindows, content_key, held_out
from everlearn.deploy import Evidence

pytestmark = pytest.mark.unit

SEQ = 8


def windows(**kw) -> HoldoutWindows:
    cfg = HoldoutConfig(**{"fraction": 0.5, "fresh_capacity": 4, "old_capacity": 16, "max_sequences_per_doc": 3, **kw})
    return HoldoutWindows(cfg, seq_len=SEQ)


def toks(n: int, start: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32)


# -- held_out ------------------------------------------------------------------------


def test_held_out_is_deterministic_and_matches_the_documented_hash():
    ids = [f"doc-{i}" for i in range(200)]
    first = [held_out(i, 0.3) for i in ids]
    assert first == [held_out(i, 0.3) for i in ids]
    for i in ids:
        h = int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big")
        assert held_out(i, 0.3) == (h / 2**64 < 0.3)


def test_held_out_edges():
    ids = [f"e{i}" for i in range(1000)]
    assert not any(held_out(i, 0.0) for i in ids)
    assert all(held_out(i, 1.0) for i in ids)


def test_held_out_is_monotone_in_fraction():
    ids = [f"m{i}" for i in range(2000)]
    small = {i for i in ids if held_out(i, 0.05)}
    large = {i for i in ids if held_out(i, 0.2)}
    assert small <= large


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.25, 0.5, 0.9])
def test_held_out_rate(fraction):
    n = 20000
    k = sum(held_out(f"id-{i}", fraction) for i in range(n))
    sd = math.sqrt(n * fraction * (1 - fraction))
    assert abs(k - n * fraction) <= 5 * sd


def test_config_bounds():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        HoldoutConfig(fraction=1.0)
    with pytest.raises(ValidationError):
        HoldoutConfig(fraction=-0.1)
    with pytest.raises(ValidationError):
        HoldoutConfig(fresh_capacity=0)
    with pytest.raises(ValidationError):
        HoldoutConfig(unknown=1)


def test_is_held_out_uses_the_configured_fraction_on_the_text():
    w = windows(fraction=0.25)
    assert [w.is_held_out(f"x{i}") for i in range(100)] == [held_out(f"x{i}", 0.25) for i in range(100)]


def test_the_same_text_under_another_id_or_rewrapped_is_held_out_again():
    w = windows(fraction=0.5)
    texts = [f"a document about topic {i}, written once\nand sent twice" for i in range(200)]
    held = [t for t in texts if w.is_held_out(t)]
    assert 60 < len(held) < 140
    assert all(w.is_held_out("  " + t.replace(" ", "\n  ").replace("\n", "  \t") + "\n") for t in held)  # re-wrapped copies
    assert not any(w.is_held_out(t.replace(" ", "  ")) for t in texts if t not in held)
    assert content_key(" a\n\tb  c ") == "a b c"


# -- windows -------------------------------------------------------------------------


def test_document_is_cut_into_windows_capped_per_document():
    w = windows(fresh_capacity=100, max_sequences_per_doc=3)
    w.add(toks(5 * SEQ), "a")  # 5 windows, 3 kept
    assert len(w.fresh) == 3
    for i, (seq, dom) in enumerate(w.fresh):
        assert dom == "a"
        assert seq.dtype == np.int32
        np.testing.assert_array_equal(seq, toks(SEQ, 1 + i * SEQ))
    assert len(w.old) == 0


def test_last_partial_window_is_kept_and_too_short_ones_skipped():
    w = windows(fresh_capacity=100, max_sequences_per_doc=10)
    w.add(toks(2 * SEQ + 3), "a")
    assert [len(s) for s, _ in w.fresh] == [SEQ, SEQ, 3]
    w.add(toks(SEQ + 1), "b")  # tail of 1 token: nothing to predict
    assert [len(s) for s, _ in w.fresh] == [SEQ, SEQ, 3, SEQ]
    w.add(toks(1), "c")
    w.add(toks(0), "c")
    assert len(w.fresh) == 4
    w.add(toks(2), "d")
    assert [len(s) for s, _ in w.fresh][-1] == 2


def test_fresh_keeps_the_newest_and_moves_aged_windows_to_old():
    w = windows(fresh_capacity=4, old_capacity=100, max_sequences_per_doc=10)
    for d in range(10):
        w.add(np.full(SEQ, d + 1, dtype=np.int32), f"dom{d % 2}")
    assert len(w.fresh) == 4
    assert [int(s[0]) for s, _ in w.fresh] == [7, 8, 9, 10]
    assert [d for _, d in w.fresh] == ["dom0", "dom1", "dom0", "dom1"]
    assert len(w.old) == 6
    assert sorted(int(s[0]) for s in w.old.items()) == [1, 2, 3, 4, 5, 6]
    assert w.old.domain_counts() == {"dom0": 3, "dom1": 3}


def test_old_is_a_bounded_reservoir():
    w = windows(fresh_capacity=2, old_capacity=5, max_sequences_per_doc=1)
    for d in range(100):
        w.add(np.full(SEQ, d + 1, dtype=np.int32), "x")
    assert len(w.fresh) == 2
    assert len(w.old) == 5
    assert w.old.seen == 98
    kept = {int(s[0]) for s in w.old.items()}
    assert kept <= set(range(1, 99))


# -- evidence ------------------------------------------------------------------------


def test_evidence_shapes_and_lengths():
    w = windows(fresh_capacity=3, old_capacity=10, max_sequences_per_doc=10)
    w.add(toks(SEQ * 4 + 5), "a")  # windows: 8, 8, 8, 8, 5 -> fresh holds the last 3
    ev = w.evidence(max_sequences=64)
    assert isinstance(ev, Evidence)
    assert ev.fresh_tokens.shape == (3, SEQ) and ev.fresh_tokens.dtype == np.int32
    assert ev.fresh_lengths.tolist() == [SEQ, SEQ, 5]
    assert ev.fresh_tokens[2, 5:].tolist() == [0, 0, 0]  # padded
    np.testing.assert_array_equal(ev.fresh_tokens[2, :5], toks(5, 1 + 4 * SEQ))
    assert ev.old_tokens.shape == (2, SEQ)
    assert ev.old_lengths.tolist() == [SEQ, SEQ]


def test_evidence_is_capped_and_takes_the_newest_fresh():
    w = windows(fresh_capacity=6, old_capacity=10, max_sequences_per_doc=1)
    for d in range(9):
        w.add(np.full(SEQ, d + 1, dtype=np.int32), "x")
    ev = w.evidence(max_sequences=2)
    assert ev.fresh_tokens[:, 0].tolist() == [8, 9]
    assert ev.old_tokens.shape == (2, SEQ)
    assert ev.old_lengths.tolist() == [SEQ, SEQ]


def test_evidence_when_empty():
    ev = windows().evidence(8)
    assert ev.fresh_tokens.shape == (0, SEQ) and ev.fresh_lengths.shape == (0,)
    assert ev.old_tokens.shape == (0, SEQ) and ev.old_lengths.shape == (0,)


# -- state ---------------------------------------------------------------------------


def test_state_dict_round_trip():
    w = windows(fresh_capacity=3, old_capacity=4, max_sequences_per_doc=2)
    rng = np.random.default_rng(0)
    for d in range(12):
        w.add(rng.integers(1, 250, size=int(rng.integers(2, 3 * SEQ))).astype(np.int32), f"d{d % 3}")
    state = w.state_dict()
    json.dumps(state["fresh"]["meta"])  # metadata is JSON, tokens are arrays
    assert state["fresh"]["arrays"]["tokens"].dtype == np.int32
    assert int(state["fresh"]["arrays"]["lengths"].sum()) == len(state["fresh"]["arrays"]["tokens"])
    json.dumps(state["old"]["meta"])

    back = windows(fresh_capacity=3, old_capacity=4, max_sequences_per_doc=2)
    back.load_state_dict(state)
    assert [d for _, d in back.fresh] == [d for _, d in w.fresh]
    for (a, _), (b, _) in zip(back.fresh, w.fresh, strict=True):
        assert a.dtype == np.int32
        np.testing.assert_array_equal(a, b)
    e1, e2 = w.evidence(16), back.evidence(16)
    for name in ("fresh_tokens", "fresh_lengths", "old_tokens", "old_lengths"):
        np.testing.assert_array_equal(getattr(e1, name), getattr(e2, name))
    assert back.old.seen == w.old.seen

    # both continue identically (the old reservoir's random stream was restored)
    for d in range(20):
        seq = np.full(SEQ, 100 + d, dtype=np.int32)
        w.add(seq, "z")
        back.add(seq, "z")
    np.testing.assert_array_equal(w.evidence(16).old_tokens, back.evidence(16).old_tokens)
