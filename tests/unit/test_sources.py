"""daemon/sources.py: DirectorySource on a local directory (file://) and on memory://."""

import json
from uuid import uuid4

import fsspec
import pytest

from everlearn.daemon.records import Document, Rejection, decode
from everlearn.daemon.sources import DirectorySource
from everlearn.errors import SourceError

pytestmark = pytest.mark.unit


class Dir:
    """A source directory on one filesystem: write / append files, build sources on it."""

    def __init__(self, url: str, fs, root: str):
        self.url, self.fs, self.root = url, fs, root.rstrip("/")

    def write(self, rel: str, data: bytes) -> None:
        path = f"{self.root}/{rel}"
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(path, data)

    def append(self, rel: str, data: bytes) -> None:
        path = f"{self.root}/{rel}"
        old = self.fs.cat_file(path) if self.fs.exists(path) else b""
        self.write(rel, old + data)

    def source(self, **kw) -> DirectorySource:
        return DirectorySource(self.url, **kw)


@pytest.fixture(params=["file", "memory"])
def d(request, tmp_path):
    if request.param == "file":
        root = tmp_path / "stream"
        root.mkdir()
        yield Dir(f"file://{root}", fsspec.filesystem("file"), str(root))
        return
    name = f"src-{uuid4().hex}"
    fs = fsspec.filesystem("memory")
    yield Dir(f"memory://{name}", fs, f"/{name}")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def lines(*texts: str) -> bytes:
    return b"".join(json.dumps({"id": t, "text": t}).encode() + b"\n" for t in texts)


def texts(records) -> list[str]:
    return [json.loads(r.data)["text"] if r.kind == "jsonl" else r.data.decode() for r in records]


def drain(src: DirectorySource, batch: int = 1000, polls: int = 3) -> list:
    """Everything the source will deliver in a few polls (enough for files to settle)."""
    out = []
    for _ in range(polls):
        out += src.poll(batch)
    return out


# -- listing ------------------------------------------------------------------------


def test_picks_jsonl_and_txt_in_name_order_and_ignores_the_rest(d):
    d.write("b.jsonl", lines("b1", "b2"))
    d.write("a.jsonl", lines("a1"))
    d.write("c.txt", b"the c document")
    d.write("notes.md", b"# not a stream file\n")
    d.write("data.json", b'{"text": "no"}\n')
    d.write(".hidden.jsonl", lines("hidden"))
    d.write(".x.jsonl.tmp", lines("tmp"))
    d.write("a.jsonl.tmp", lines("tmp2"))
    src = d.source()
    first = src.poll(100)
    assert texts(first) == ["a1", "b1", "b2"]  # the .txt waits to settle
    assert [r.provenance["file"] for r in first] == ["a.jsonl", "b.jsonl", "b.jsonl"]
    assert texts(src.poll(100)) == ["the c document"]
    assert src.poll(100) == []
    assert set(src.position()["offsets"]) == {"a.jsonl", "b.jsonl", "c.txt"}


def test_records_carry_provenance_default_id_and_domain(d):
    body = lines("x", "y")
    d.write("f.jsonl", body)
    recs = d.source(default_domain="news").poll(10)
    assert [r.kind for r in recs] == ["jsonl", "jsonl"]
    second = body.index(b"\n") + 1
    assert [r.provenance for r in recs] == [{"file": "f.jsonl", "offset": 0}, {"file": "f.jsonl", "offset": second}]
    assert [r.default_id for r in recs] == ["f.jsonl@0", f"f.jsonl@{second}"]
    assert {r.default_domain for r in recs} == {"news"}
    assert recs[0].data == body[: second - 1]  # without the newline


def test_missing_directory_is_empty_not_an_error(d):
    src = DirectorySource(d.url + "/not-there")
    assert src.poll(10) == []
    assert src.position() == {"offsets": {}}


def test_bad_url_is_a_source_error():
    with pytest.raises(SourceError, match="source.url"):
        DirectorySource("nosuchprotocol-xyz://bucket/prefix")


def test_subdirectory_name_is_the_default_domain(d):
    d.write("top.jsonl", lines("t"))
    d.write("law/a.jsonl", lines("l"))
    d.write("code/deep/b.jsonl", lines("c"))
    d.write("law/doc.txt", b"a law text")
    recs = drain(d.source(default_domain="misc"))
    by_text = {t: r for t, r in zip(texts(recs), recs, strict=True)}
    assert by_text["t"].default_domain == "misc"
    assert by_text["l"].default_domain == "law"
    assert by_text["c"].default_domain == "code"
    assert by_text["a law text"].default_domain == "law"
    assert by_text["l"].provenance["file"] == "law/a.jsonl"
    docs = [decode(r, 1000) for r in recs]
    assert {doc.text: doc.domain for doc in docs} == {"t": "misc", "l": "law", "c": "code", "a law text": "law"}


# -- position and seek --------------------------------------------------------------


def test_position_is_json_serialisable(d):
    d.write("a.jsonl", lines("1", "2"))
    d.write("s/b.jsonl", lines("3"))
    src = d.source()
    src.poll(100)
    pos = src.position()
    assert json.loads(json.dumps(pos)) == pos
    assert pos == {"offsets": {"a.jsonl": len(lines("1", "2")), "s/b.jsonl": len(lines("3"))}}


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 7])
def test_seek_on_a_new_source_continues_exactly(d, batch):
    d.write("a.jsonl", lines(*[f"a{i}" for i in range(5)]))
    d.write("b.jsonl", lines(*[f"b{i}" for i in range(4)]))
    d.write("c.jsonl", b"\n\n" + lines("c0") + b"   \n" + lines("c1"))  # blank lines are skipped
    want = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(4)] + ["c0", "c1"]
    got: list[str] = []
    pos = {"offsets": {}}
    for _ in range(50):  # a fresh source (a restart) after every poll
        src = d.source()
        src.seek(json.loads(json.dumps(pos)))
        recs = src.poll(batch)
        assert len(recs) <= batch
        got += texts(recs)
        pos = src.position()
        if len(got) >= len(want):
            break
    assert got == want
    src = d.source()
    src.seek(pos)
    assert drain(src) == []


def test_seek_mid_file_then_appended_lines(d):
    d.write("a.jsonl", lines("1", "2", "3"))
    src = d.source()
    assert texts(src.poll(2)) == ["1", "2"]
    pos = src.position()
    assert pos["offsets"]["a.jsonl"] == len(lines("1", "2"))
    d.append("a.jsonl", lines("4"))
    again = d.source()
    again.seek(pos)
    assert texts(again.poll(10)) == ["3", "4"]


def test_seek_replaces_the_position(d):
    d.write("a.jsonl", lines("1", "2"))
    src = d.source()
    src.poll(10)
    src.seek({"offsets": {}})
    assert texts(src.poll(10)) == ["1", "2"]


# -- growing files ------------------------------------------------------------------


def test_appended_lines_are_picked_up(d):
    d.write("a.jsonl", lines("1"))
    src = d.source()
    assert texts(src.poll(10)) == ["1"]
    assert src.poll(10) == []
    d.append("a.jsonl", lines("2", "3"))
    assert texts(src.poll(10)) == ["2", "3"]
    d.write("b.jsonl", lines("4"))
    d.append("a.jsonl", lines("5"))
    assert texts(src.poll(10)) == ["5", "4"]  # files in name order
    assert src.poll(10) == []


def test_final_line_without_newline_waits_until_settled(d):
    d.write("a.jsonl", lines("1") + b'{"text": "par')
    src = d.source()
    assert texts(src.poll(10)) == ["1"]
    d.append("a.jsonl", b'tial"}')  # still growing: not settled
    assert src.poll(10) == []
    assert src.position()["offsets"]["a.jsonl"] == len(lines("1"))
    assert texts(src.poll(10)) == ["partial"]  # size unchanged since the last poll
    assert src.poll(10) == []
    assert drain(src) == []


def test_final_line_completed_by_a_newline_is_delivered_without_waiting(d):
    d.write("a.jsonl", b'{"text": "x"}')
    src = d.source()
    assert src.poll(10) == []  # first sight: not settled
    d.append("a.jsonl", b"\n")
    assert texts(src.poll(10)) == ["x"]
    assert src.position()["offsets"]["a.jsonl"] == len(b'{"text": "x"}\n')


def test_settled_final_line_then_more_lines(d):
    d.write("a.jsonl", b'{"text": "x"}')
    src = d.source()
    assert drain(src) != []
    d.append("a.jsonl", b"\n" + lines("y"))
    assert texts(drain(src)) == ["y"]


def test_txt_is_one_record_delivered_once_settled(d):
    body = "line one\nline two\n\nno final newline"
    d.write("doc.txt", body[:10].encode())
    src = d.source()
    assert src.poll(10) == []  # first sight
    d.write("doc.txt", body.encode())
    assert src.poll(10) == []  # changed since the last poll
    recs = src.poll(10)
    assert len(recs) == 1
    r = recs[0]
    assert r.kind == "txt"
    assert r.data == body.encode()
    assert r.provenance == {"file": "doc.txt", "offset": 0}
    assert r.default_id == "doc.txt"
    assert src.poll(10) == []
    assert src.position()["offsets"]["doc.txt"] == len(body.encode())


def test_max_records_is_respected(d):
    d.write("a.jsonl", lines(*[f"a{i}" for i in range(5)]))
    d.write("b.jsonl", lines(*[f"b{i}" for i in range(5)]))
    d.write("c.txt", b"c")
    d.write("d.txt", b"d")
    src = d.source()
    src.poll(0)  # look once so the .txt files can settle
    got = []
    for _ in range(10):
        recs = src.poll(3)
        assert len(recs) <= 3
        got += texts(recs)
    assert got == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)] + ["c", "d"]


def test_poll_with_timeout_returns_when_idle(d):
    t = [0.0]

    def clock():
        t[0] += 0.05
        return t[0]

    src = d.source(clock=clock)
    assert src.poll(10, timeout_s=0.1) == []


# -- long lines ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, 16, 33, 64, 1 << 20])
def test_long_line_is_truncated_and_the_following_lines_are_intact(d, chunk):
    cap = 32
    long = json.dumps({"id": "long", "text": "z" * 200}).encode()
    before, after = lines("b"), lines("c", "d")
    body = before + long + b"\n" + after + long + b"\n" + lines("e") + long  # and a long final line
    d.write("a.jsonl", body)
    src = d.source(read_chunk_bytes=chunk, max_line_bytes=cap)
    recs = drain(src, polls=3)
    assert len(recs) == 7
    offsets = [r.provenance["offset"] for r in recs]
    want_offsets = [0, len(before)]
    want_offsets.append(want_offsets[-1] + len(long) + 1)
    want_offsets.append(want_offsets[-1] + len(lines("c")))
    want_offsets.append(want_offsets[-1] + len(lines("d")))
    want_offsets.append(want_offsets[-1] + len(long) + 1)
    want_offsets.append(want_offsets[-1] + len(lines("e")))
    assert offsets == want_offsets
    for i in (1, 4, 6):
        r = recs[i]
        assert cap < len(r.data) <= max(cap + 1, chunk)
        assert long.startswith(r.data)
        rej = decode(r, max_doc_bytes=cap)
        assert isinstance(rej, Rejection) and rej.reason == "too_large"
    good = [decode(recs[i], max_doc_bytes=cap) for i in (0, 2, 3, 5)]
    assert all(isinstance(g, Document) for g in good)
    assert [g.text for g in good] == ["b", "c", "d", "e"]
    assert src.position()["offsets"]["a.jsonl"] == len(body)


def test_long_line_position_resumes_after_it(d):
    long = b'{"text": "' + b"q" * 500 + b'"}\n'
    d.write("a.jsonl", long + lines("next"))
    src = d.source(read_chunk_bytes=7, max_line_bytes=64)
    first = src.poll(1)
    assert len(first) == 1 and len(first[0].data) == 65
    fresh = d.source(read_chunk_bytes=7, max_line_bytes=64)
    fresh.seek(src.position())
    assert fresh.position()["offsets"]["a.jsonl"] == len(long)
    rec = fresh.poll(10)
    assert texts(rec) == ["next"]
    assert rec[0].provenance["offset"] == len(long)
