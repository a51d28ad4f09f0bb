"""CheckpointStore (learners/checkpoints.py) on memory:// and on a file:// directory."""

import hashlib
import json
from pathlib import Path
from uuid import uuid4

import fsspec
import pytest

from everlearn.errors import CheckpointCorruptError, CheckpointError, StorageUnavailable
from everlearn.learners.checkpoints import CheckpointRef, CheckpointStore, FileEntry

pytestmark = pytest.mark.unit


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    # the memory filesystem is process-global: a unique root per test
    url = f"memory://t-{uuid4().hex}" if request.param == "memory" else (tmp_path / "ckpt").as_uri()
    s = CheckpointStore(url)
    yield s
    if request.param == "memory" and s.fs.exists(s.root):
        s.fs.rm(s.root, recursive=True)


def write(store, step, files):
    return store.commit(step, {name: store.put(step, name, data) for name, data in files.items()})


def flip_byte(store, ref, name, index=0):
    """Damage one stored byte the way storage would, behind the store's back."""
    path = f"{store.root}/{ref.name}/{name}"
    if store.url.startswith("file://"):
        p = Path(path)
        data = bytearray(p.read_bytes())
        data[index] ^= 0x01
        p.write_bytes(bytes(data))
    else:
        data = bytearray(store.fs.cat_file(path))
        data[index] ^= 0x01
        store.fs.pipe_file(path, bytes(data))


def set_aside_names(store):
    base = f"{store.root}/set-aside"
    if not store.fs.exists(base):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for p in store.fs.ls(base, detail=False))


def stored_names(store):
    if not store.fs.exists(store.root):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.root, detail=False))


# -- writing and reading ---------------------------------------------------------


def test_put_commit_read(store):
    payload = {"model.safetensors": b"\x00\x01weights" * 100, "notes.json": b'{"a": 1}', "empty.bin": b""}
    ref = write(store, 120, payload)
    assert ref.step == 120
    assert ref.name == "step-000000120"
    assert ref.uri == store.uri("step-000000120")
    assert ref.uri.endswith("/step-000000120")
    for name, data in payload.items():
        assert store.read(ref, name) == data
        # the ref's URI is a real URL of the checkpoint directory
        with fsspec.open(f"{ref.uri}/{name}", "rb") as f:
            assert f.read() == data
    # and its store URL opens the same store
    assert CheckpointStore(ref.store_url).latest() == ref


def test_put_returns_digest(store):
    data = b"hello checkpoint"
    assert store.put(1, "x.bin", data) == FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def test_manifest_lists_sha256_and_size(store):
    payload = {"a.bin": b"alpha", "b.bin": b"b" * 1000}
    ref = store.commit(5, {n: store.put(5, n, d) for n, d in payload.items()}, meta={"served_version": 3})
    manifest = store.manifest(ref)
    assert manifest["step"] == 5
    assert manifest["meta"] == {"served_version": 3}
    assert manifest["files"] == {
        n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in payload.items()
    }
    # the ref carries the digest of the manifest as stored
    raw = store.fs.cat_file(f"{store.root}/{ref.name}/manifest.json")
    assert ref.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert json.loads(raw) == manifest


def test_latest_points_to_newest(store):
    assert store.latest() is None
    assert store.list() == []
    r1 = write(store, 10, {"w": b"1"})
    assert store.latest() == r1
    r2 = write(store, 20, {"w": b"2"})
    assert store.fs.cat_file(f"{store.root}/LATEST").decode().strip() == r2.name
    assert store.latest() == r2
    assert store.list() == [r1, r2]
    assert store.read(store.latest(), "w") == b"2"


def test_list_is_ordered_by_step_not_commit_order(store):
    r30 = write(store, 30, {"w": b"30"})
    r5 = write(store, 5, {"w": b"5"})
    r100 = write(store, 100, {"w": b"100"})
    assert [r.step for r in store.list()] == [5, 30, 100]
    assert store.list() == [r5, r30, r100]


def test_ref_round_trips_through_dict(store):
    ref = write(store, 7, {"w": b"x"})
    again = CheckpointRef.from_dict(json.loads(json.dumps(ref.to_dict())))
    assert again == ref
    assert store.ref(ref.name) == ref
    assert store.read(again, "w") == b"x"


def test_a_second_store_on_the_same_url_sees_the_checkpoints(store):
    ref = write(store, 3, {"w": b"abc"})
    other = CheckpointStore(store.url + "/")
    assert other.latest() == ref
    assert other.read(ref, "w") == b"abc"


def test_committing_the_same_step_twice_raises(store):
    ref = write(store, 42, {"w": b"first"})
    store.put(42, "w", b"other")  # overwriting a committed file is caught by its digest...
    with pytest.raises(CheckpointError, match="already committed"):
        store.commit(42, {"w": FileEntry(hashlib.sha256(b"other").hexdigest(), 5)})
    with pytest.raises(CheckpointCorruptError):
        store.read(ref, "w")


def test_committing_the_same_step_twice_keeps_the_first_manifest(store):
    ref = write(store, 42, {"w": b"first"})
    store.put(42, "extra", b"e")
    with pytest.raises(CheckpointError):
        store.commit(42, {"w": FileEntry(hashlib.sha256(b"first").hexdigest(), 5), "extra": FileEntry(hashlib.sha256(b"e").hexdigest(), 1)})
    assert store.manifest(ref)["files"].keys() == {"w"}
    assert store.read(ref, "w") == b"first"


def test_commit_refuses_a_file_whose_size_differs(store):
    store.put(9, "w", b"short")
    with pytest.raises(CheckpointCorruptError):
        store.commit(9, {"w": FileEntry(hashlib.sha256(b"longer data").hexdigest(), 11)})
    assert store.list() == []
    assert store.latest() is None


def test_commit_refuses_a_file_whose_digest_differs(store):
    store.put(9, "w", b"abcde")
    with pytest.raises(CheckpointCorruptError):
        store.commit(9, {"w": FileEntry(hashlib.sha256(b"vwxyz").hexdigest(), 5)})
    assert store.latest() is None


def test_refused_commit_leaves_no_manifest(store):
    store.put(9, "w", b"abcde")
    with pytest.raises(CheckpointCorruptError):
        store.commit(9, {"w": FileEntry(hashlib.sha256(b"vwxyz").hexdigest(), 5)})
    assert store.list() == []
    # the writer can retry the step with the right digest
    ref = store.commit(9, {"w": store.put(9, "w", b"abcde")})
    assert store.read(ref, "w") == b"abcde"


@pytest.mark.parametrize("name", ["manifest.json", "LATEST", "a/b"])
def test_reserved_file_names_refused(store, name):
    with pytest.raises(ValueError):
        store.put(1, name, b"x")


def test_reading_an_unlisted_file_raises(store):
    ref = write(store, 1, {"w": b"x"})
    store.put(1, "later", b"y")  # written after the commit: not part of the checkpoint
    with pytest.raises(CheckpointError):
        store.read(ref, "later")
    with pytest.raises(CheckpointError):
        store.read(ref, "nothing")


# -- corruption ------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 7, -1])
def test_flipped_byte_makes_read_raise(store, index):
    data = bytes(range(256)) * 4
    ref = write(store, 11, {"model.safetensors": data, "other": b"fine"})
    flip_byte(store, ref, "model.safetensors", index)
    with pytest.raises(CheckpointCorruptError):
        store.read(ref, "model.safetensors")
    with pytest.raises(CheckpointCorruptError):
        store.verify(ref)
    assert store.read(ref, "other") == b"fine"  # the undamaged file still reads


def test_flipped_byte_on_disk(tmp_path):
    root = tmp_path / "store"
    s = CheckpointStore(root.as_uri())
    ref = write(s, 1, {"w": b"0123456789"})
    f = root / "step-000000001" / "w"
    assert f.read_bytes() == b"0123456789"
    f.write_bytes(b"0123456788")  # same size, one byte differs
    with pytest.raises(CheckpointCorruptError, match="sha256"):
        s.read(ref, "w")


def test_truncated_and_missing_files_raise(store):
    ref = write(store, 2, {"a": b"abcdef", "b": b"xyz"})
    store.fs.pipe_file(f"{store.root}/{ref.name}/a", b"abc")
    with pytest.raises(CheckpointCorruptError):
        store.read(ref, "a")
    store.fs.rm(f"{store.root}/{ref.name}/b")
    with pytest.raises(CheckpointCorruptError):
        store.read(ref, "b")


def test_edited_manifest_is_detected_by_the_ref(store):
    ref = write(store, 3, {"a": b"abcdef"})
    flip_byte(store, ref, "manifest.json", -3)
    with pytest.raises(CheckpointCorruptError):
        store.read(ref, "a")


def test_latest_skips_corrupted_newest(store):
    r1 = write(store, 1, {"w": b"one"})
    r2 = write(store, 2, {"w": b"two"})
    assert store.latest() == r2
    flip_byte(store, r2, "w")
    assert store.latest() == r1
    # and with both damaged there is none
    flip_byte(store, r1, "w")
    assert store.latest() is None


def test_latest_skips_newest_with_missing_file(store):
    r1 = write(store, 1, {"w": b"one"})
    r2 = write(store, 2, {"w": b"two", "opt": b"state"})
    store.fs.rm(f"{store.root}/{r2.name}/opt")
    assert store.latest() == r1


def test_latest_when_latest_file_is_missing_or_stale(store):
    r1 = write(store, 1, {"w": b"one"})
    r2 = write(store, 2, {"w": b"two"})
    store.fs.rm(f"{store.root}/LATEST")
    assert store.latest() == r2  # falls back to listing
    store.fs.pipe_file(f"{store.root}/LATEST", b"step-000000099")  # names nothing
    assert store.latest() == r2
    store.fs.pipe_file(f"{store.root}/LATEST", r1.name.encode())  # a crash before LATEST moved: the newest still wins
    assert store.latest() == r2


def test_latest_skips_newest_with_unparseable_manifest(store):
    r1 = write(store, 1, {"w": b"one"})
    r2 = write(store, 2, {"w": b"two"})
    # the first byte of the manifest is '{'; flipping one bit makes it 'z'
    flip_byte(store, r2, "manifest.json", 0)
    assert store.latest() == r1


# -- uncommitted directories and sweep -------------------------------------------


def test_uncommitted_directory_is_never_listed_or_loaded(store):
    r1 = write(store, 1, {"w": b"one"})
    store.put(2, "w", b"half-written")  # the writer died before the manifest
    assert store.list() == [r1]
    assert store.latest() == r1
    with pytest.raises(CheckpointError, match="never committed"):
        store.ref("step-000000002")


def test_uncommitted_directory_only(store):
    store.put(5, "w", b"x")
    assert store.list() == []
    assert store.latest() is None
    swept = store.sweep(keep_last=3)
    assert swept.removed == [] and [m[0] for m in swept.moved] == ["step-000000005"]
    assert "step-000000005" not in stored_names(store)
    assert set_aside_names(store) == ["step-000000005"]  # moved, never silently deleted


def test_sweep_removes_uncommitted_and_keeps_last(store):
    refs = [write(store, s, {"w": str(s).encode()}) for s in (1, 2, 3, 4, 5)]
    store.put(6, "w", b"orphan")
    swept = store.sweep(keep_last=2)
    assert sorted(swept.removed) == ["step-000000001", "step-000000002", "step-000000003"]
    assert [m[0] for m in swept.moved] == ["step-000000006"]
    assert store.list() == refs[-2:]
    assert [n for n in stored_names(store) if n.startswith("step-")] == ["step-000000004", "step-000000005"]
    assert "LATEST" in stored_names(store)
    assert store.latest() == refs[-1]
    for r in refs[-2:]:
        store.verify(r)
    # nothing left to do the second time
    again = store.sweep(keep_last=2)
    assert again.removed == [] and again.moved == []


def test_sweep_keeps_protected(store):
    refs = [write(store, s, {"w": str(s).encode()}) for s in (10, 20, 30, 40)]
    removed = store.sweep(keep_last=1, protect={refs[0].name}).removed
    assert sorted(removed) == [refs[1].name, refs[2].name]
    assert store.list() == [refs[0], refs[3]]
    assert store.read(refs[0], "w") == b"10"


def test_sweep_keep_last_zero_removes_all_unprotected(store):
    refs = [write(store, s, {"w": b"x"}) for s in (1, 2, 3)]
    removed = store.sweep(keep_last=0, protect=frozenset({refs[1].name})).removed
    assert sorted(removed) == [refs[0].name, refs[2].name]
    assert store.list() == [refs[1]]


def test_sweep_keep_last_larger_than_count(store):
    refs = [write(store, s, {"w": b"x"}) for s in (1, 2)]
    assert store.sweep(keep_last=10).removed == []
    assert store.list() == refs


def test_sweep_on_an_empty_store(store):
    swept = store.sweep(keep_last=1)
    assert swept.removed == [] and swept.moved == []


# -- recovery: the newest checkpoint that verifies; the rest moved aside -------------


def test_recover_moves_damaged_and_uncommitted_newer_checkpoints_aside(store):
    r1 = write(store, 10, {"w": b"one"})
    r2 = write(store, 20, {"w": b"two"})
    flip_byte(store, r2, "w")
    store.put(30, "w", b"half-written")  # a crash before the manifest
    ref, set_aside = store.recover()
    assert ref == r1
    moved = {name: reason for name, _, reason in set_aside.moved}
    assert set(moved) == {r2.name, "step-000000030"}
    assert "sha256" in moved[r2.name] and "never committed" in moved["step-000000030"]
    assert set_aside_names(store) == sorted(moved)
    assert [n for n in stored_names(store) if n.startswith("step-")] == [r1.name]
    assert store.fs.cat_file(f"{store.root}/LATEST").decode() == r1.name
    # the damaged step's number is free again: the run commits it anew
    r2b = write(store, 20, {"w": b"two, again"})
    assert store.latest() == r2b


def test_recover_keeps_older_good_checkpoints_and_notes_why(store):
    refs = [write(store, s, {"w": str(s).encode()}) for s in (1, 2, 3)]
    store.fs.rm(f"{store.root}/{refs[2].name}/w")
    ref, set_aside = store.recover()
    assert ref == refs[1] and store.list() == refs[:2]
    (name, uri, reason), = set_aside.moved
    note = json.loads(store.fs.cat_file(f"{store.root}/set-aside/{uri.rsplit('/', 1)[-1]}/SET_ASIDE.json"))
    assert note["name"] == name == refs[2].name
    assert note["reason"] == reason and "missing" in reason


def test_recover_on_an_empty_or_all_damaged_store(store):
    ref, set_aside = store.recover()
    assert ref is None and set_aside.moved == []
    r = write(store, 5, {"w": b"x"})
    flip_byte(store, r, "manifest.json", 0)
    ref, set_aside = store.recover()
    assert ref is None and [m[0] for m in set_aside.moved] == [r.name]


def test_begin_moves_a_leftover_partial_write_aside_and_refuses_a_committed_step(store):
    store.put(7, "w", b"from a crashed attempt")
    assert [m[0] for m in store.begin(7).moved] == ["step-000000007"]
    r = write(store, 7, {"w": b"fresh"})
    assert store.read(r, "w") == b"fresh"
    with pytest.raises(CheckpointError, match="already committed"):
        store.begin(7)


def test_set_aside_keeps_only_the_newest_few(store):
    small = CheckpointStore(store.url, keep_set_aside=2)
    for s in (1, 2, 3):
        small.put(s, "w", b"orphan")
        small.sweep(keep_last=1)
    assert set_aside_names(small) == ["step-000000002", "step-000000003"]


def test_an_outage_while_recovering_moves_nothing(store, monkeypatch):
    r = write(store, 3, {"w": b"x"})

    def down(*args, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(store.fs, "cat_file", down)
    with pytest.raises(StorageUnavailable, match="did not answer"):
        store.recover()
    monkeypatch.undo()
    assert store.recover()[0] == r and set_aside_names(store) == []
