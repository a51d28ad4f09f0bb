"""Buffer state as sharded files: bounded shard size, exact round trip, identical future."""

import numpy as np
import pytest

from everlearn.buffers import StratifiedReservoir, UniformReservoir, WeightedReservoir
from everlearn.buffers.persist import from_files, to_files

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("cls", [UniformReservoir, WeightedReservoir, StratifiedReservoir])
def test_sharded_round_trip_gives_identical_future(cls):
    src = cls(100, 16, seed=3)
    rng = np.random.default_rng(0)
    items = [rng.integers(3, 200, size=rng.integers(1, 17)).astype(np.int32) for _ in range(400)]
    src.add_many(items[:300], ["x", "y", "z"] * 100)
    files = to_files("buffer", src.state_dict(), shard_bytes=1500)
    shards = [n for n in files if n.endswith(".safetensors")]
    assert len(shards) > 5 and all(len(files[n]) < 1500 + 1024 for n in shards)  # + safetensors header
    dst = cls(100, 16, seed=99)
    dst.load_state_dict(from_files("buffer", files.__getitem__))
    for b in (src, dst):
        b.add_many(items[300:], ["x", "y", "z", "w"] * 25)
    assert [s.tolist() for s in src.items()] == [s.tolist() for s in dst.items()]
    np.testing.assert_array_equal(src.sample(50), dst.sample(50))


def test_empty_buffer_and_a_missing_shard():
    files = to_files("buffer", UniformReservoir(4, 8).state_dict())
    restored = UniformReservoir(4, 8)
    restored.load_state_dict(from_files("buffer", files.__getitem__))
    assert len(restored) == 0
    buf = UniformReservoir(50, 8)
    buf.add_many([np.arange(8, dtype=np.int32)] * 50)
    files = to_files("buffer", buf.state_dict(), shard_bytes=200)
    del files[sorted(n for n in files if n.endswith(".safetensors"))[1]]
    with pytest.raises(KeyError):
        from_files("buffer", files.__getitem__)
