"""The same source and checkpoint code on s3:// against a real S3-compatible server (moto)."""

import gzip
import json

import boto3
import pytest
import s3fs
import zstandard

from everlearn.daemon import store_s3
from everlearn.daemon.records import Document, decode
from everlearn.daemon.sources import DirectorySource
from everlearn.daemon.store_fsspec import FsspecStore
from everlearn.errors import CheckpointCorruptError, SourceUnavailable
from everlearn.learners import CheckpointStore
from tests.proxy import Proxy

pytestmark = pytest.mark.integration

SETTLE, CLOSE = 2.0, 300.0


def _fs(opts):
    return s3fs.S3FileSystem(**opts, skip_instance_cache=True)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def _source(url: str, opts: dict, events: list | None = None, **kw) -> DirectorySource:
    kw.setdefault("clock", Clock())
    if events is not None:
        kw["events"] = lambda name, fields: events.append((name, fields))
    return DirectorySource(url, opts, **kw)


def _line(i, prefix="a") -> bytes:
    return json.dumps({"id": f"{prefix}{i}", "text": f"{prefix} {i}"}).encode() + b"\n"


def _texts(records) -> list[str]:
    return [json.loads(r.data)["text"] if r.kind == "jsonl" else r.data.decode() for r in records]


def _boto(opts):
    return boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id=opts["key"],
                        aws_secret_access_key=opts["secret"], region_name="us-east-1")


def test_directory_source_over_s3_resumes_from_its_position(s3_bucket):
    url, opts = s3_bucket
    fs = _fs(opts)
    root = url.removeprefix("s3://")
    lines = [_line(i) for i in range(5)]
    fs.pipe(f"{root}/stream/a.jsonl", b"".join(lines))
    fs.pipe(f"{root}/stream/news/b.txt", b"a whole document")
    src = _source(f"{url}/stream", opts, default_domain="dflt")
    first = src.poll(3)
    assert [r.provenance for r in first] == [{"file": "a.jsonl", "offset": i * len(lines[0])} for i in range(3)]
    position = json.loads(json.dumps(src.position()))
    again = _source(f"{url}/stream", opts, default_domain="dflt")
    again.seek(position)
    rest = again.poll(10)
    again.clock.advance(SETTLE)  # the .txt is taken once it has not changed for settle_s
    rest += again.poll(10)
    docs = [decode(r, 1000) for r in first + rest]
    assert all(isinstance(d, Document) for d in docs)
    assert [d.id for d in docs] == ["a0", "a1", "a2", "a3", "a4", "news/b.txt"]
    assert docs[-1].domain == "news" and docs[0].domain == "dflt"


def test_objects_uploaded_by_another_client_while_polling_are_picked_up(s3_bucket):
    url, opts = s3_bucket
    root = url.removeprefix("s3://")
    shared = s3fs.S3FileSystem(**opts)  # the instance fsspec hands the source too: its listing cache is warm
    shared.pipe(f"{root}/stream/000.jsonl", _line(0))
    src = _source(f"{url}/stream", opts)
    assert _texts(src.poll(10)) == ["a 0"]
    assert shared.find(f"{root}/stream")  # cached listing without the objects to come
    boto, other = _boto(opts), _fs(opts)
    got = []
    for i in range(1, 7):
        if i % 2:
            boto.put_object(Bucket=root, Key=f"stream/{i:03d}.jsonl", Body=_line(i))
        else:
            other.pipe(f"{root}/stream/law/{i:03d}.jsonl", _line(i))
        got += src.poll(10)
    assert sorted(_texts(got)) == [f"a {i}" for i in range(1, 7)]
    assert {r.default_domain for r in got if r.provenance["file"].startswith("law/")} == {"law"}
    boto.put_object(Bucket=root, Key="stream/007.jsonl", Body=_line(7)[:-1])  # no final newline: waits to settle
    assert src.poll(10) == []
    src.clock.advance(SETTLE)
    assert _texts(src.poll(10)) == ["a 7"]


def test_finished_objects_are_not_listed_again(s3_bucket, monkeypatch):
    url, opts = s3_bucket
    root = url.removeprefix("s3://")
    fs = _fs(opts)
    n = 200
    fs.pipe({f"{root}/stream/f{i:04d}.jsonl": _line(i) for i in range(n)})
    fs.pipe({f"{root}/stream/news/g{i:03d}.jsonl": _line(i, "g") for i in range(20)})
    src = _source(f"{url}/stream", opts)
    calls: dict[str, int] = {}
    listed: list[str] = []
    inner = src.fs.call_s3

    def counting(method, *a, **kw):
        out = inner(method, *a, **kw)
        calls[method] = calls.get(method, 0) + 1
        if method == "list_objects_v2":
            listed.extend(o["Key"] for o in out.get("Contents", []))
            listed.extend(p["Prefix"] for p in out.get("CommonPrefixes", []))
        return out

    monkeypatch.setattr(src.fs, "call_s3", counting)
    assert len(src.poll(1000)) == n + 20
    assert len(listed) == n + 20 + 1  # every object, and the prefix news/: the counter sees what S3 returned
    src.clock.advance(CLOSE)
    assert src.poll(1000) == []
    pos = src.position()
    assert pos["files"] == {} and pos["dirs"][""]["after"] == f"f{n - 1:04d}.jsonl"
    assert pos["dirs"]["news"]["after"] == "news/g019.jsonl"
    assert len(json.dumps(pos)) < 300
    listed.clear()
    calls.clear()
    fs.pipe(f"{root}/stream/f{n:04d}.jsonl", _line(n))
    fs.pipe(f"{root}/stream/news/g020.jsonl", _line(20, "g"))
    assert sorted(_texts(src.poll(10))) == [f"a {n}", "g 20"]
    assert sorted(listed) == sorted([f"stream/f{n:04d}.jsonl", "stream/news/", "stream/news/g020.jsonl"])
    assert calls.get("head_object", 0) == 0
    # a new source resumes from the position: the finished objects stay unlisted
    again = _source(f"{url}/stream", opts)
    again.seek(json.loads(json.dumps(src.position())))
    listed.clear()
    monkeypatch.setattr(again.fs, "call_s3", counting)
    assert again.poll(10) == []
    assert sorted(listed) == sorted([f"stream/f{n:04d}.jsonl", "stream/news/", "stream/news/g020.jsonl"])
    fs.pipe(f"{root}/stream/f{n + 1:04d}.jsonl", _line(n + 1))
    assert _texts(again.poll(10)) == [f"a {n + 1}"]


def test_renamed_replaced_and_rewritten_objects(s3_bucket, monkeypatch):
    url, opts = s3_bucket
    root = url.removeprefix("s3://")
    fs = _fs(opts)
    events: list = []
    fs.pipe(f"{root}/stream/a.jsonl", b"".join(_line(i) for i in range(4)))
    fs.pipe(f"{root}/stream/c.jsonl", _line(0, "c"))
    src = _source(f"{url}/stream", opts, events)
    assert _texts(src.poll(2)) == ["a 0", "a 1"]
    fs.mv(f"{root}/stream/a.jsonl", f"{root}/stream/b.jsonl")  # copy + delete: the ETag comes along
    gets = []
    inner = store_s3._get_range
    monkeypatch.setattr(store_s3, "_get_range", lambda *a: gets.append(a[2]) or inner(*a))
    recs = src.poll(10)
    assert _texts(recs) == ["a 2", "a 3", "c 0"]
    # known by its ETag, not by reading it: the rest of b, b's head (its fingerprint grows with the offset), c
    assert gets == ["stream/b.jsonl", "stream/b.jsonl", "stream/c.jsonl"]
    assert [r.provenance["file"] for r in recs] == ["b.jsonl", "b.jsonl", "c.jsonl"]
    assert [(n, f["from"], f["to"]) for n, f in events] == [("file_renamed", "a.jsonl", "b.jsonl")]
    # "appending" to an object rewrites it: a new ETag, the same first bytes: read on from the offset
    fs.pipe(f"{root}/stream/c.jsonl", _line(0, "c") + _line(1, "c"))
    assert _texts(src.poll(10)) == ["c 1"]
    assert len(events) == 1
    # other content under the name: reported, not read from the start
    fs.pipe(f"{root}/stream/c.jsonl", b"".join(_line(i, "x") for i in range(3)))
    assert src.poll(10) == []
    assert events[-1][0] == "file_replaced" and events[-1][1]["file"] == "c.jsonl"
    fs.rm(f"{root}/stream/b.jsonl")
    assert src.poll(10) == []
    assert events[-1][0] == "file_deleted" and events[-1][1]["file"] == "b.jsonl" and events[-1][1]["bytes"] == 0


def test_compressed_objects_uploaded_while_polling_are_read_once_in_key_order(s3_bucket):
    url, opts = s3_bucket
    root = url.removeprefix("s3://")
    boto = _boto(opts)
    bodies = {f"{i:03d}": b"".join(_line(j, f"k{i}-") for j in range(40)) for i in range(6)}
    pack = {0: lambda b: b, 1: lambda b: gzip.compress(b, mtime=0), 2: lambda b: zstandard.ZstdCompressor().compress(b)}
    suffix = {0: ".jsonl", 1: ".jsonl.gz", 2: ".jsonl.zst"}
    src = _source(f"{url}/stream", opts, read_chunk_bytes=64)  # many ranged GETs per object
    got = []
    for i, (name, body) in enumerate(bodies.items()):
        boto.put_object(Bucket=root, Key=f"stream/{name}{suffix[i % 3]}", Body=pack[i % 3](body))
        got += src.poll(25)  # a plain object at once; a compressed one once settled
        src.clock.advance(SETTLE)
        got += src.poll(25)  # a compressed object read over two polls too: its decoder is kept between them
    for _ in range(5):
        got += src.poll(25)
    want = [f"k{i}- {j}" for i in range(6) for j in range(40)]
    assert _texts(got) == want  # each once, in key order
    assert [r.provenance["file"] for r in got[::40]] == [f"{n}{suffix[i % 3]}" for i, n in enumerate(bodies)]
    assert got[41].provenance == {"file": "001.jsonl.gz", "offset": len(_line(0, "k1-"))}  # decompressed offsets
    files = src.position()["files"]
    assert files["004.jsonl.gz"]["end"] and files["005.jsonl.zst"]["offset"] == len(bodies["005"])
    src.clock.advance(SETTLE)
    assert src.poll(1000) == []


def test_the_generic_fsspec_lister_does_not_trust_a_cached_listing(s3_bucket):
    """Other protocols (gcs, azure, ...) go through FsspecStore; s3fs has a listing cache like theirs."""
    url, opts = s3_bucket
    root = url.removeprefix("s3://")
    fs = _fs(opts)
    fs.pipe(f"{root}/stream/a.jsonl", _line(0))
    store = FsspecStore(fs, f"{root}/stream")
    assert set(store.list({}, set()).stats) == {"a.jsonl"}
    assert fs.dircache  # find() filled the cache
    _boto(opts).put_object(Bucket=root, Key="stream/b.jsonl", Body=_line(1))
    found = store.list({}, set()).stats
    assert set(found) == {"a.jsonl", "b.jsonl"}
    with store.open(found["b.jsonl"]) as r:
        assert r.read(100) == _line(1)


def test_an_outage_is_source_unavailable_and_the_stream_resumes_exactly(s3_bucket):
    url, opts = s3_bucket
    root = url.removeprefix("s3://")
    _fs(opts).pipe(f"{root}/stream/a.jsonl", b"".join(_line(i) for i in range(5)))
    proxy = Proxy(int(opts["client_kwargs"]["endpoint_url"].rsplit(":", 1)[1]))
    try:
        via = {**opts, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"},
               "config_kwargs": {"retries": {"max_attempts": 1}}, "skip_instance_cache": True}
        src = _source(f"{url}/stream", via)
        assert _texts(src.poll(2)) == ["a 0", "a 1"]
        before = src.position()
        proxy.down()
        with pytest.raises(SourceUnavailable):
            src.poll(10)
        assert src.position() == before
        proxy.up = True
        assert _texts(src.poll(10)) == ["a 2", "a 3", "a 4"]
    finally:
        proxy.close()


def test_checkpoint_store_over_s3_verifies_hashes(s3_bucket):
    url, opts = s3_bucket
    store = CheckpointStore(f"{url}/ckpt", opts)
    files = {"w.bin": store.put(3, "w.bin", b"weights" * 100), "s.json": store.put(3, "s.json", b"{}")}
    ref = store.commit(3, files, meta={"note": "s3"})
    assert ref.uri.startswith("s3://") and store.latest() == ref
    assert store.read(ref, "w.bin") == b"weights" * 100
    # a reader elsewhere finds it through the URI alone
    assert CheckpointStore(ref.store_url, opts).latest() == ref
    # S3 accepts a changed object; our sha256 check refuses it
    _fs(opts).pipe(f"{url.removeprefix('s3://')}/ckpt/{ref.name}/w.bin", b"weightz" * 100)
    with pytest.raises(CheckpointCorruptError, match="sha256"):
        store.read(ref, "w.bin")
    assert store.latest() is None
