"""The same source and checkpoint code on s3:// against a real S3-compatible server (moto)."""

import json

import pytest
import s3fs

from everlearn.daemon.records import Document, decode
from everlearn.daemon.sources import DirectorySource
from everlearn.errors import CheckpointCorruptError
from everlearn.learners import CheckpointStore

pytestmark = pytest.mark.integration


def _fs(opts):
    return s3fs.S3FileSystem(**opts, skip_instance_cache=True)


def test_directory_source_over_s3_resumes_from_its_position(s3_bucket):
    url, opts = s3_bucket
    fs = _fs(opts)
    root = url.removeprefix("s3://")
    lines = [json.dumps({"id": f"a{i}", "text": f"alpha {i}"}).encode() + b"\n" for i in range(5)]
    fs.pipe(f"{root}/stream/a.jsonl", b"".join(lines))
    fs.pipe(f"{root}/stream/news/b.txt", b"a whole document")
    src = DirectorySource(f"{url}/stream", opts, default_domain="dflt")
    first = src.poll(3)
    assert [r.provenance for r in first] == [{"file": "a.jsonl", "offset": i * len(lines[0])} for i in range(3)]
    position = json.loads(json.dumps(src.position()))
    again = DirectorySource(f"{url}/stream", opts, default_domain="dflt")
    again.seek(position)
    rest = again.poll(10) + again.poll(10)  # the .txt is taken once its size has settled
    docs = [decode(r, 1000) for r in first + rest]
    assert all(isinstance(d, Document) for d in docs)
    assert [d.id for d in docs] == ["a0", "a1", "a2", "a3", "a4", "news/b.txt"]
    assert docs[-1].domain == "news" and docs[0].domain == "dflt"


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
