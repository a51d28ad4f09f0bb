"""One contract every replay buffer passes (bounds, persistence, determinism, tiny streams, dedup)."""

import numpy as np
import pytest

from everlearn.buffers import (
    BufferConfig,
    ReplayBuffer,
    StratifiedReservoir,
    UniformReservoir,
    WeightedReservoir,
    build_buffer,
)

pytestmark = pytest.mark.unit

FACTORIES = {
    "uniform": lambda cap, seed=0, dedup=False: UniformReservoir(cap, 4, seed=seed, dedup=dedup),
    "stratified": lambda cap, seed=0, dedup=False: StratifiedReservoir(cap, 4, seed=seed, dedup=dedup),
    "weighted": lambda cap, seed=0, dedup=False: WeightedReservoir(cap, 4, seed=seed, dedup=dedup, domain_weights={"b": 3.0}),
}


@pytest.fixture(params=sorted(FACTORIES))
def make(request):
    return FACTORIES[request.param]


def stream(start, stop):
    items = [np.array([i % 97, i // 97, 7][: 1 + i % 3], dtype=np.int32) for i in range(start, stop)]
    return items, ["a" if i % 2 else "b" for i in range(start, stop)]


def kept(buf):
    return [tuple(s.tolist()) for s in buf.items()]


def test_protocol(make):
    assert isinstance(make(3), ReplayBuffer)


@pytest.mark.parametrize("cap", [1, 2, 10])
def test_bounds_on_a_long_stream(make, cap):
    buf = make(cap)
    for start in range(0, 600, 37):
        buf.add_many(*stream(start, start + 37))
        assert len(buf) == min(buf.seen, cap)
        assert sum(buf.domain_counts().values()) == len(buf)
    assert buf.seen == 629
    tokens, lengths = buf.sample_with_lengths(5)
    assert tokens.shape == (5, 4) and np.all((lengths >= 1) & (lengths <= 3))


def test_empty_and_tiny_streams(make):
    buf = make(4)
    buf.add_many([], [])
    assert len(buf) == 0 and buf.seen == 0
    with pytest.raises(ValueError):
        buf.sample(1)
    buf.add_many(*stream(0, 1))
    assert len(buf) == 1 and kept(buf) == [(0,)]
    assert (buf.sample(3)[:, 0] == 0).all()


def test_too_long_sequence_is_refused_whole(make):
    buf = make(4)
    with pytest.raises(ValueError, match="seq_len"):
        buf.add_many([np.zeros(2, np.int32), np.zeros(9, np.int32)], ["a", "a"])
    assert len(buf) == 0 and buf.seen == 0


def test_same_seed_same_buffer(make):
    a, b, c = make(8, seed=5), make(8, seed=5), make(8, seed=6)
    for buf in (a, b, c):
        buf.add_many(*stream(0, 500))
    assert kept(a) == kept(b)
    np.testing.assert_array_equal(a.sample(20), b.sample(20))
    assert kept(a) != kept(c)


def test_restore_gives_identical_buffer_and_future(make):
    src = make(8, seed=1)
    src.add_many(*stream(0, 300))
    dst = make(8, seed=42)
    dst.add_many(*stream(900, 910))
    dst.load_state_dict(src.state_dict())
    assert kept(dst) == kept(src) and dst.seen == src.seen
    for buf in (src, dst):
        buf.add_many(*stream(300, 700))
    assert kept(dst) == kept(src)
    np.testing.assert_array_equal(dst.sample(32), src.sample(32))


def test_state_is_arrays_plus_json(make):
    import json

    buf = make(6)
    buf.add_many(*stream(0, 50))
    state = buf.state_dict()
    json.dumps(state["meta"])
    assert all(isinstance(v, np.ndarray) for v in state["arrays"].values())


def test_dedup_keeps_one_copy(make):
    buf = make(10, dedup=True)
    same = [np.array([1, 2], np.int32)] * 5
    buf.add_many(same, ["a"] * 5)
    buf.add_many(same, ["a"] * 5)
    assert len(buf) == 1 and buf.duplicates == 9


def test_build_buffer_follows_the_config():
    assert isinstance(build_buffer(BufferConfig(), 8), UniformReservoir)
    assert isinstance(build_buffer(BufferConfig(kind="weighted", domain_weights={"x": 2.0}), 8), WeightedReservoir)


def test_domain_table_is_bounded_on_a_stream_of_unique_domains(make, monkeypatch):
    from everlearn.buffers import storage

    monkeypatch.setattr(storage, "MAX_DOMAINS", 5)
    buf = make(12)
    for start in range(0, 400, 40):
        items, _ = stream(start, start + 40)
        buf.add_many(items, [f"doc-{i}" for i in range(start, start + 40)])  # a new domain per item
    assert len(buf.slots.domains) <= 5 and buf.slots.domains[-1] == storage.OTHER_DOMAIN
    assert sum(buf.domain_counts().values()) == len(buf)
    # stratified: the four named domains offered one item each and keep their quotas' rest free
    assert len(buf) == (4 + buf.quotas[4] if buf.kind == "stratified" else 12)  # (other) saw hundreds: full
    restored = make(12)
    restored.load_state_dict(buf.state_dict())
    assert restored.domain_counts() == buf.domain_counts()
