"""TokenPacker and ReplayMixer (learners/batching.py)."""

import json

import numpy as np
import pytest

from everlearn.buffers import UniformReservoir
from everlearn.learners.batching import ReplayMixer, Span, TokenPacker

pytestmark = pytest.mark.unit

EOS = 1


def make_docs(n, seed=0, max_len=30):
    rng = np.random.default_rng(seed)
    return [
        (f"doc-{i}", f"dom-{i % 3}", rng.integers(3, 259, size=int(rng.integers(0, max_len))).astype(np.int32))
        for i in range(n)
    ]


def stream_of(docs):
    """The packed stream written out by hand: every doc's tokens, then EOS."""
    out = []
    for _, _, toks in docs:
        out.extend(int(t) for t in toks)
        out.append(EOS)
    return out


def owner_of(docs):
    """(doc_id, offset in doc) of every token of the packed stream."""
    out = []
    for doc_id, _, toks in docs:
        out.extend((doc_id, i) for i in range(len(toks) + 1))
    return out


# -- TokenPacker -----------------------------------------------------------------


def test_windows_are_the_stream_cut_into_seq_len_pieces():
    seq_len = 8
    docs = make_docs(20)
    packer = TokenPacker(seq_len=seq_len, eos_id=EOS)
    for d in docs:
        packer.add(*d)
    expected = stream_of(docs)
    assert packer.pending_tokens == len(expected)
    assert packer.windows_ready() == len(expected) // seq_len

    windows, _, _, _, _ = packer.take(packer.windows_ready())
    assert windows.dtype == np.int32
    assert windows.shape == (len(expected) // seq_len, seq_len)
    assert windows.ravel().tolist() == expected[: windows.size]
    assert packer.pending_tokens == len(expected) - windows.size
    assert packer.windows_ready() == 0


def test_small_example_by_hand():
    packer = TokenPacker(seq_len=4, eos_id=EOS)
    packer.add("a", "x", np.array([10, 11, 12]))
    packer.add("b", "y", np.array([20, 21, 22, 23, 24]))
    packer.add("c", "z", np.array([], dtype=np.int32))
    # stream: 10 11 12 EOS | 20 21 22 23 | 24 EOS EOS(c)
    assert packer.pending_tokens == 11
    windows, lineage, domains, _, _ = packer.take(2)
    assert windows.tolist() == [[10, 11, 12, EOS], [20, 21, 22, 23]]
    assert lineage == [[Span("a", 0, 4)], [Span("b", 0, 4)]]
    assert domains == ["x", "y"]
    assert packer.pending_tokens == 3
    packer.add("d", "w", np.array([30, 31]))
    windows, lineage, domains, _, _ = packer.take(1)
    assert windows.tolist() == [[24, EOS, EOS, 30]]
    assert lineage == [[Span("b", 4, 6), Span("c", 0, 1), Span("d", 0, 1)]]
    assert domains == ["y"]


def test_lineage_covers_every_token_exactly_once_in_order():
    seq_len = 7
    docs = make_docs(40, seed=3)
    packer = TokenPacker(seq_len=seq_len, eos_id=EOS)
    stream, owners = stream_of(docs), owner_of(docs)
    doc_len = {d: len(t) + 1 for d, _, t in docs}
    domain_of = {d: dom for d, dom, _ in docs}

    pos = 0
    covered = []
    for d in docs:
        packer.add(*d)
        n = packer.windows_ready()
        if n == 0:
            continue
        windows, lineage, domains, _, _ = packer.take(n)
        for window, spans, dom in zip(windows, lineage, domains, strict=True):
            # the spans of one window add up to the window and name its tokens
            assert sum(s.end - s.start for s in spans) == seq_len
            assert dom == domain_of[spans[0].doc_id]
            flat = [(s.doc_id, off) for s in spans for off in range(s.start, s.end)]
            assert flat == owners[pos : pos + seq_len]
            assert window.tolist() == stream[pos : pos + seq_len]
            for s in spans:
                assert 0 <= s.start < s.end <= doc_len[s.doc_id]
            covered.extend(flat)
            pos += seq_len
    # flush the tail: add a long final doc and take everything
    packer.add("tail", "t", np.full(seq_len, 5, dtype=np.int32))
    docs.append(("tail", "t", np.full(seq_len, 5, dtype=np.int32)))
    owners = owner_of(docs)
    rest = packer.pending_tokens
    if packer.windows_ready():
        _, lineage, _, _, _ = packer.take(packer.windows_ready())
        covered.extend((s.doc_id, off) for spans in lineage for s in spans for off in range(s.start, s.end))
    # in order, no token twice, no gap; only the untaken remainder is missing
    assert covered == owners[: len(covered)]
    assert len(covered) + packer.pending_tokens == len(owners)
    assert rest >= packer.pending_tokens


def test_take_more_than_ready_raises_and_changes_nothing():
    packer = TokenPacker(seq_len=4, eos_id=EOS)
    packer.add("a", "x", np.arange(10, 16))  # 7 tokens: 1 window ready
    with pytest.raises(ValueError):
        packer.take(2)
    assert packer.pending_tokens == 7
    windows, _, _, _, _ = packer.take(1)
    assert windows.tolist() == [[10, 11, 12, 13]]
    with pytest.raises(ValueError):
        packer.take(1)


def test_take_zero_on_empty_packer():
    packer = TokenPacker(seq_len=4, eos_id=EOS)
    windows, lineage, domains, _, _ = packer.take(0)
    assert windows.shape == (0, 4) and lineage == [] and domains == []
    with pytest.raises(ValueError):
        packer.take(1)


def test_state_dict_mid_stream_continues_identically():
    seq_len = 6
    docs = make_docs(30, seed=7)
    a = TokenPacker(seq_len=seq_len, eos_id=EOS)
    for d in docs[:15]:
        a.add(*d)
    a.take(a.windows_ready() - 1)  # leave a window and a partly consumed document behind
    state = a.state_dict()
    state = {"arrays": {k: v.copy() for k, v in state["arrays"].items()}, "meta": json.loads(json.dumps(state["meta"]))}

    b = TokenPacker(seq_len=seq_len, eos_id=EOS)
    b.add("junk", "j", np.arange(3, 40))  # replaced by the loaded state
    b.load_state_dict(state)
    assert b.pending_tokens == a.pending_tokens
    assert b.windows_ready() == a.windows_ready()

    for d in docs[15:]:
        a.add(*d)
        b.add(*d)
        n = a.windows_ready()
        assert b.windows_ready() == n
        wa, la, da, _, _ = a.take(n)
        wb, lb, db, _, _ = b.take(n)
        np.testing.assert_array_equal(wa, wb)
        assert la == lb and da == db
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["meta"] == sb["meta"]
    for k in sa["arrays"]:
        np.testing.assert_array_equal(sa["arrays"][k], sb["arrays"][k])


def test_restored_packer_reproduces_the_uninterrupted_stream():
    seq_len = 5
    docs = make_docs(25, seed=11)
    whole = TokenPacker(seq_len=seq_len, eos_id=EOS)
    for d in docs:
        whole.add(*d)
    ref_windows, ref_lineage, _, _, _ = whole.take(whole.windows_ready())

    first = TokenPacker(seq_len=seq_len, eos_id=EOS)
    for d in docs[:10]:
        first.add(*d)
    w1, l1, _, _, _ = first.take(first.windows_ready())
    second = TokenPacker(seq_len=seq_len, eos_id=EOS)
    second.load_state_dict(first.state_dict())
    for d in docs[10:]:
        second.add(*d)
    w2, l2, _, _, _ = second.take(second.windows_ready())
    np.testing.assert_array_equal(np.concatenate([w1, w2]), ref_windows)
    assert l1 + l2 == ref_lineage


def test_window_weights_are_token_weighted_means_across_document_boundaries():
    packer = TokenPacker(seq_len=5, eos_id=EOS)
    packer.add("a", "x", np.array([10, 11, 12]), weight=2.0)  # 4 tokens with EOS
    packer.add("b", "y", np.array([20, 21, 22, 23, 24]), weight=0.5)  # 6
    packer.add("c", "z", np.array([], dtype=np.int32))  # 1 (EOS only), no weight: counts 1.0
    packer.add("d", "w", np.array([40, 41, 42]), weight=3.0)  # 4
    windows, lineage, domains, weights, _ = packer.take(3)
    assert lineage == [
        [Span("a", 0, 4), Span("b", 0, 1)],
        [Span("b", 1, 6)],
        [Span("c", 0, 1), Span("d", 0, 4)],
    ]
    assert domains == ["x", "y", "z"]
    assert weights == pytest.approx([(4 * 2.0 + 1 * 0.5) / 5, 0.5, (1 * 1.0 + 4 * 3.0) / 5])
    assert weights == pytest.approx([1.7, 0.5, 2.6])


def test_window_weights_across_takes_follow_the_partly_consumed_document():
    packer = TokenPacker(seq_len=4, eos_id=EOS)
    packer.add("a", "x", np.arange(10, 15), weight=4.0)  # 6 tokens
    packer.add("b", "y", np.arange(20, 21))  # 2 tokens, no weight
    assert packer.take(1).weights == [4.0]
    packer.add("c", "z", np.arange(30, 33), weight=0.0)  # 4 tokens; 0 is a weight, not "none"
    taken = packer.take(2)
    assert taken.lineage == [[Span("a", 4, 6), Span("b", 0, 2)], [Span("c", 0, 4)]]
    assert taken.weights == [(2 * 4.0 + 2 * 1.0) / 4, 0.0]


def test_window_weights_are_none_without_weighted_documents():
    packer = TokenPacker(seq_len=4, eos_id=EOS)
    for doc in make_docs(10, seed=2):
        packer.add(*doc)
    taken = packer.take(packer.windows_ready())
    assert len(taken.tokens) > 0
    assert taken.weights is None
    assert taken == (taken.tokens, taken.lineage, taken.domains, None, taken.provenance)  # a plain tuple too


def test_state_round_trip_keeps_weights():
    seq_len = 6
    docs = make_docs(12, seed=5)
    weight_of = {doc_id: (None if i % 3 == 0 else 0.5 * i) for i, (doc_id, _, _) in enumerate(docs)}
    a = TokenPacker(seq_len=seq_len, eos_id=EOS)
    for doc_id, dom, toks in docs[:8]:
        a.add(doc_id, dom, toks, weight=weight_of[doc_id])
    a.take(a.windows_ready() - 1)  # a weighted document is left partly consumed
    state = a.state_dict()
    state["meta"] = json.loads(json.dumps(state["meta"]))
    segments = state["meta"]["segments"]
    assert {s["id"]: s.get("weight") for s in segments} == {s["id"]: weight_of[s["id"]] for s in segments}
    assert any(s.get("weight") for s in segments)

    b = TokenPacker(seq_len=seq_len, eos_id=EOS)
    b.load_state_dict(state)
    for doc_id, dom, toks in docs[8:]:
        a.add(doc_id, dom, toks, weight=weight_of[doc_id])
        b.add(doc_id, dom, toks, weight=weight_of[doc_id])
    wa, wb = a.take(a.windows_ready()), b.take(b.windows_ready())
    np.testing.assert_array_equal(wa.tokens, wb.tokens)
    assert wa.lineage == wb.lineage and wa.domains == wb.domains
    assert wa.weights is not None and wb.weights == wa.weights
    # and they are the token-weighted means of the spans' documents
    for spans, w in zip(wb.lineage, wb.weights, strict=True):
        expected = sum((s.end - s.start) * (weight_of[s.doc_id] if weight_of[s.doc_id] is not None else 1.0) for s in spans) / seq_len
        assert w == pytest.approx(expected)


# -- ReplayMixer -----------------------------------------------------------------


def filled_buffer(n=5, seq_len=8, seed=0):
    buf = UniformReservoir(capacity=16, seq_len=seq_len, seed=seed)
    buf.add_many([np.full(3 + i % 4, 100 + i, dtype=np.int32) for i in range(n)], [f"d{i}" for i in range(n)])
    return buf


def test_no_replay_from_an_empty_buffer():
    mixer = ReplayMixer(UniformReservoir(capacity=4, seq_len=8), fraction=0.5, batch_size=8)
    assert mixer.n_replay() == 0
    assert mixer.n_fresh() == 8
    fresh = np.arange(64, dtype=np.int32).reshape(8, 8)
    tokens, lengths, n = mixer.mix(fresh)
    assert n == 0
    np.testing.assert_array_equal(tokens, fresh)
    np.testing.assert_array_equal(lengths, [8] * 8)


@pytest.mark.parametrize(
    "fraction, batch_size, expected",
    [
        (0.25, 8, 2),
        (0.5, 8, 4),
        (0.3, 10, 3),
        (0.25, 4, 1),
        (0.6, 5, 3),
        (0.0, 8, 0),
        (0.9, 4, 3),  # round(3.6) = 4 would be the whole batch: capped at batch_size - 1
        (0.99, 8, 7),
        (0.5, 1, 0),  # a batch of one is always fresh
    ],
)
def test_n_replay(fraction, batch_size, expected):
    mixer = ReplayMixer(filled_buffer(), fraction=fraction, batch_size=batch_size)
    assert mixer.n_replay() == expected
    assert mixer.n_fresh() == batch_size - expected
    assert mixer.n_fresh() >= 1


def test_n_replay_is_round_of_fraction_times_batch_and_never_the_whole_batch():
    buf = filled_buffer()
    for batch_size in range(1, 33):
        for fraction in np.linspace(0.05, 0.95, 19):
            n = ReplayMixer(buf, fraction=float(fraction), batch_size=batch_size).n_replay()
            assert 0 <= n < batch_size
            want = round(float(fraction) * batch_size)
            if 1 <= want < batch_size:
                assert n == want, (batch_size, fraction)


def test_mix_puts_replay_last_with_true_lengths():
    seq_len = 8
    buf = filled_buffer(seq_len=seq_len)
    kept = {tuple(buf.slots.tokens[i]): int(buf.slots.lengths[i]) for i in range(len(buf))}
    mixer = ReplayMixer(buf, fraction=0.5, batch_size=6)
    assert mixer.n_replay() == 3
    fresh = np.arange(3 * seq_len, dtype=np.int32).reshape(3, seq_len) + 1000
    tokens, lengths, n = mixer.mix(fresh)
    assert n == 3
    assert tokens.shape == (6, seq_len)
    assert lengths.shape == (6,)
    np.testing.assert_array_equal(tokens[:3], fresh)
    np.testing.assert_array_equal(lengths[:3], [seq_len] * 3)
    for row, length in zip(tokens[3:], lengths[3:], strict=True):
        assert tuple(row) in kept  # a row the buffer holds
        assert length == kept[tuple(row)]  # with its own length
        assert (row[length:] == 0).all() and (row[:length] != 0).all()


def test_mix_is_deterministic_given_buffer_seed():
    fresh = np.full((2, 8), 7, dtype=np.int32)
    a = ReplayMixer(filled_buffer(seed=4), fraction=0.5, batch_size=4).mix(fresh)
    b = ReplayMixer(filled_buffer(seed=4), fraction=0.5, batch_size=4).mix(fresh)
    for x, y in zip(a[:2], b[:2], strict=True):
        np.testing.assert_array_equal(x, y)


def test_remember_adds_fresh_windows_with_domains():
    buf = UniformReservoir(capacity=10, seq_len=4)
    mixer = ReplayMixer(buf, fraction=0.25, batch_size=4)
    fresh = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=np.int32)
    mixer.remember(fresh, ["news", "code"])
    assert len(buf) == 2 and buf.seen == 2
    np.testing.assert_array_equal(buf.slots.tokens[:2], fresh)
    np.testing.assert_array_equal(buf.slots.lengths[:2], [4, 4])
    assert buf.domain_counts() == {"news": 1, "code": 1}
    assert mixer.n_replay() == 1  # replay starts once the buffer holds something


def test_state_is_token_arrays_plus_document_metadata_and_old_json_states_still_load():
    packer = TokenPacker(seq_len=4, eos_id=EOS)
    packer.add("a", "x", np.array([5, 6, 7]), provenance={"file": "f.jsonl", "offset": 0})
    packer.add("b", "y", np.array([8, 9]))
    packer.take(1)  # a's 3 tokens and its EOS
    state = packer.state_dict()
    np.testing.assert_array_equal(state["arrays"]["tokens"], [8, 9, EOS])
    assert state["arrays"]["tokens"].dtype == np.int32 and list(state["arrays"]["lengths"]) == [3]
    assert state["meta"] == {"segments": [{"id": "b", "domain": "y", "start": 0}]}
    old = {"segments": [{"id": "b", "domain": "y", "start": 0, "tokens": [8, 9, EOS]}]}
    again = TokenPacker(seq_len=4, eos_id=EOS)
    again.load_state_dict(old)
    assert again.pending_tokens == 3
    with pytest.raises(ValueError, match="lengths"):
        again.load_state_dict({"arrays": {"tokens": np.zeros(2, np.int32), "lengths": np.array([3])}, "meta": state["meta"]})


def test_windows_carry_the_provenance_of_their_documents():
    packer = TokenPacker(seq_len=4, eos_id=EOS)
    packer.add("a", "x", np.array([5, 6]), provenance={"file": "f.jsonl", "offset": 0})
    packer.add("b", "x", np.array([8, 9, 10]), provenance={"file": "f.jsonl", "offset": 30})
    taken = packer.take(1)
    assert taken.provenance == {"a": {"file": "f.jsonl", "offset": 0}, "b": {"file": "f.jsonl", "offset": 30}}
