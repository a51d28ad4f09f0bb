"""daemon/holdout.py and daemon/holdout_old.py: which documents are held out; the fresh, old (per domain) and probe windows."""

import hashlib
import json
import math

import numpy as np
import pytest

from everlearn.buffers import UniformReservoir
from everlearn.buffers.persist import from_files, to_files
from everlearn.daemon.holdout import (
    HoldoutConfig,
    HoldoutWindows,
    content_key,
    document_key,
    held_out,
)
from everlearn.deploy import Evidence

pytestmark = pytest.mark.unit

SEQ = 8


def windows(probes: int = 16, **kw) -> HoldoutWindows:
    cfg = HoldoutConfig(**{"fraction": 0.5, "fresh_capacity": 4, "old_capacity": 16, "max_sequences_per_doc": 3, **kw})
    return HoldoutWindows(cfg, seq_len=SEQ, probes=probes)


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
    for i, (seq, dom, _) in enumerate(w.fresh):
        assert dom == "a"
        assert seq.dtype == np.int32
        np.testing.assert_array_equal(seq, toks(SEQ, 1 + i * SEQ))
    assert len(w.old) == 0


def test_last_partial_window_is_kept_and_too_short_ones_skipped():
    w = windows(fresh_capacity=100, max_sequences_per_doc=10)
    w.add(toks(2 * SEQ + 3), "a")
    assert [len(s) for s, *_ in w.fresh] == [SEQ, SEQ, 3]
    w.add(toks(SEQ + 1), "b")  # tail of 1 token: nothing to predict
    assert [len(s) for s, *_ in w.fresh] == [SEQ, SEQ, 3, SEQ]
    w.add(toks(1), "c")
    w.add(toks(0), "c")
    assert len(w.fresh) == 4
    w.add(toks(2), "d")
    assert [len(s) for s, *_ in w.fresh][-1] == 2


def test_fresh_keeps_the_newest_and_moves_aged_windows_to_old():
    w = windows(fresh_capacity=4, old_capacity=100, max_sequences_per_doc=10)
    for d in range(10):
        w.add(np.full(SEQ, d + 1, dtype=np.int32), f"dom{d % 2}")
    assert len(w.fresh) == 4
    assert [int(s[0]) for s, *_ in w.fresh] == [7, 8, 9, 10]
    assert [d for _, d, _ in w.fresh] == ["dom0", "dom1", "dom0", "dom1"]
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
    assert [d for _, d, _ in back.fresh] == [d for _, d, _ in w.fresh]
    for (a, *_), (b, *_) in zip(back.fresh, w.fresh, strict=True):
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


# -- per-domain old reservoirs, document keys, probes ----------------------------------


def test_old_reservoirs_are_per_domain_bounded_and_pool_late_domains():
    w = windows(fresh_capacity=1, old_per_domain=3, old_domains=2, max_sequences_per_doc=1)
    for d in range(60):
        w.add(np.full(SEQ, d + 1, dtype=np.int32), f"dom{d % 5}")
    assert list(w.old.reservoirs) == ["dom0", "dom1", "(other)"]  # the first two named, the rest pooled
    assert all(len(r) == 3 for r in w.old.reservoirs.values()) and len(w.old) == 9
    assert w.old.seen == 59
    assert set(w.old.domain_counts()) <= {f"dom{i}" for i in range(5)}  # the pooled keep their own names
    ev = w.evidence(max_sequences=2)
    assert ev.old_domains == ("(other)",) * 2 + ("dom0",) * 2 + ("dom1",) * 2  # up to 2 per domain
    assert len(ev.old_tokens) == 6


def test_a_small_domain_keeps_its_share_of_the_old_window():
    w = windows(fresh_capacity=1, old_per_domain=4, max_sequences_per_doc=1)
    for d in range(200):
        w.add(np.full(SEQ, d % 250 + 1, dtype=np.int32), "big" if d % 20 else "small")
    assert w.old.domain_counts() == {"big": 4, "small": 4}


def test_sequences_carry_their_documents_key_into_the_evidence():
    w = windows(fresh_capacity=4, old_capacity=16, max_sequences_per_doc=3)
    w.add(toks(3 * SEQ), "a", document=11)
    w.add(toks(2 * SEQ, 50), "b", document=22)
    w.add(toks(SEQ, 90), "b")  # no key given: one from its tokens
    ev = w.evidence(16)
    assert ev.fresh_documents[:3].tolist() == [11, 22, 22] and ev.fresh_documents[3] not in (11, 22)
    assert ev.old_documents.tolist() == [11, 11] and ev.old_domains == ("a", "a")
    assert ev.counts("fresh") == {"documents": 3, "sequences": 4, "tokens": 4 * (SEQ - 1)}
    assert document_key("a  text\n") == document_key("a text") != document_key("another text")
    assert 0 <= document_key("x") < 2**63


def test_probes_are_the_first_sequence_of_the_first_documents_and_stay():
    w = windows(probes=3, fresh_capacity=2, max_sequences_per_doc=3)
    for d in range(10):
        w.add(toks(2 * SEQ, 10 * d + 1), "a", document=d)
    assert [int(p[0]) for p in w.probes] == [1, 11, 21]  # the first window of the first three documents
    ev = w.evidence(8)
    assert ev.probe_tokens[:, 0].tolist() == [1, 11, 21] and ev.probe_lengths.tolist() == [SEQ] * 3


def test_state_round_trips_documents_probes_and_per_domain_reservoirs():
    w = windows(fresh_capacity=3, old_per_domain=4, old_domains=2, max_sequences_per_doc=2)
    rng = np.random.default_rng(1)
    for d in range(30):
        w.add(rng.integers(1, 250, size=int(rng.integers(2, 3 * SEQ))).astype(np.int32), f"d{d % 4}", document=d)
    state = w.state_dict()
    json.dumps(state["old"]["meta"])
    assert state["fresh"]["arrays"]["documents"].dtype == np.int64
    back = windows(fresh_capacity=3, old_per_domain=4, old_domains=2, max_sequences_per_doc=2)
    back.load_state_dict(to_files_and_back(state))
    e1, e2 = w.evidence(16), back.evidence(16)
    for name in ("fresh_tokens", "fresh_lengths", "fresh_documents", "old_tokens", "old_documents", "probe_tokens", "probe_lengths"):
        np.testing.assert_array_equal(getattr(e1, name), getattr(e2, name))
    assert e1.old_domains == e2.old_domains and list(back.old.reservoirs) == list(w.old.reservoirs)
    for d in range(30, 60):  # both continue identically
        seq = np.full(SEQ, d, dtype=np.int32)
        w.add(seq, f"d{d % 5}", document=d)
        back.add(seq, f"d{d % 5}", document=d)
    np.testing.assert_array_equal(w.evidence(16).old_tokens, back.evidence(16).old_tokens)
    np.testing.assert_array_equal(w.evidence(16).old_documents, back.evidence(16).old_documents)


def to_files_and_back(state: dict) -> dict:
    """As a checkpoint stores it: the old reservoirs through buffers/persist.py, the rest as is."""
    files = to_files("holdout_old", state["old"], 1 << 20)
    return {**state, "old": from_files("holdout_old", files.__getitem__)}


def test_state_from_before_documents_probes_and_per_domain_reservoirs_loads():
    """One old reservoir over every domain, a fresh window without document keys, no probes."""
    old = UniformReservoir(6, SEQ, seed=0)
    for d in range(40):
        old.add_many([np.full(SEQ, d + 1, dtype=np.int32)], ["man" if d % 4 else "python"])
    fresh = [np.full(SEQ, 100 + i, dtype=np.int32) for i in range(3)]
    state = {"fresh": {"arrays": {"tokens": np.concatenate(fresh), "lengths": np.full(3, SEQ, dtype=np.int64)},
                       "meta": {"domains": ["man", "man", "python"]}},
             "old": old.state_dict()}
    w = windows(probes=5, fresh_capacity=3, old_per_domain=4, max_sequences_per_doc=1)
    w.load_state_dict(to_files_and_back(state))
    kept = {int(s[0]) for s in old.items()}
    assert {int(s[0]) for s in w.old.items()} <= kept and len(w.old) == min(len(kept), 6)
    assert set(w.old.reservoirs) <= {"man", "python"}
    counts = old.domain_counts()
    for name, r in w.old.reservoirs.items():
        assert len(r) == min(counts[name], 4)
        assert r.seen >= len(r)
    ev = w.evidence(16)
    assert len(set(ev.fresh_documents.tolist())) == 3 and len(set(ev.old_documents.tolist())) == len(w.old)  # each its own document
    assert [int(p[0]) for p in w.probes][:3] == [100, 101, 102] and len(w.probes) == 5  # from the fresh, then the old windows
    for d in range(20):  # and it goes on taking old windows
        w.add(np.full(SEQ, 200 + d, dtype=np.int32), "python")
    assert len(w.old.reservoirs["python"]) == 4


def test_config_takes_old_capacity_from_older_configs():
    assert HoldoutConfig(old_capacity=100).old_per_domain == 100
    assert HoldoutConfig(old_capacity=100, old_per_domain=8).old_per_domain == 8
    assert HoldoutConfig().old_per_domain == 64
