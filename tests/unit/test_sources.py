"""daemon/sources.py: DirectorySource on a local directory (file://) and on memory://."""

import gzip
import json
import os
import time
import tracemalloc
from uuid import uuid4

import fsspec
import pytest
import zstandard

from everlearn.daemon.listing import fingerprint
from everlearn.daemon.records import Document, Rejection, decode
from everlearn.daemon.sources import DirectorySource
from everlearn.errors import SourceError, SourceUnavailable

pytestmark = pytest.mark.unit

SETTLE, CLOSE = 2.0, 300.0  # the source's defaults


class Clock:
    """A monotonic clock the test moves: settle and close times without sleeping."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class Dir:
    """A source directory on one filesystem: write / append / rename / delete files, build sources on it."""

    def __init__(self, url: str, fs, root: str, local: bool):
        self.url, self.fs, self.root, self.local = url, fs, root.rstrip("/"), local
        self.clock = Clock()
        self.events: list[tuple[str, dict]] = []
        self._mtime = 0

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)
        if self.local:  # a distinct mtime per write, even within the file system's timestamp granularity (in the past: ctime stays "now")
            self._mtime += 1
            os.utime(path, ns=(10**18, 10**18 + self._mtime * 10**6))

    def append(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        old = self.fs.cat_file(path) if self.fs.exists(path) else b""
        self.write(rel, old + data)

    def rename(self, a: str, b: str) -> None:
        self.fs.mv(self.path(a), self.path(b))

    def delete(self, rel: str) -> None:
        self.fs.rm(self.path(rel))

    def source(self, **kw) -> DirectorySource:
        kw.setdefault("clock", self.clock)
        kw.setdefault("events", lambda name, fields: self.events.append((name, fields)))
        return DirectorySource(self.url, **kw)

    def named(self, name: str) -> list[dict]:
        return [f for n, f in self.events if n == name]


@pytest.fixture(params=["file", "memory"])
def d(request, tmp_path):
    if request.param == "file":
        root = tmp_path / "stream"
        root.mkdir()
        yield Dir(f"file://{root}", fsspec.filesystem("file"), str(root), True)
        return
    name = f"src-{uuid4().hex}"
    fs = fsspec.filesystem("memory")
    yield Dir(f"memory://{name}", fs, f"/{name}", False)
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def lines(*texts: str) -> bytes:
    return b"".join(json.dumps({"id": t, "text": t}).encode() + b"\n" for t in texts)


def texts(records) -> list[str]:
    return [json.loads(r.data)["text"] if r.kind == "jsonl" else r.data.decode() for r in records]


def drain(src: DirectorySource, batch: int = 1000, polls: int = 3) -> list:
    """Everything the source will deliver in a few polls, the clock moving a settle time between them."""
    out = []
    for _ in range(polls):
        out += src.poll(batch)
        src.clock.advance(SETTLE)
    return out


def close_all(src: DirectorySource) -> list:
    """Let every file be closed: past close_after_s, then a poll."""
    src.clock.advance(CLOSE)
    return src.poll(1000)


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
    d.clock.advance(SETTLE)
    assert texts(src.poll(100)) == ["the c document"]
    assert src.poll(100) == []
    assert set(src.position()["files"]) == {"a.jsonl", "b.jsonl", "c.txt"}


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
    assert src.position() == {"format": 2, "dirs": {}, "files": {}}


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
    assert pos["format"] == 2
    assert {rel: e["offset"] for rel, e in pos["files"].items()} == {"a.jsonl": len(lines("1", "2")), "s/b.jsonl": len(lines("3"))}
    assert all(e["fpn"] == e["offset"] for e in pos["files"].values())  # the bytes read so far are fingerprinted
    assert set(pos["dirs"]) == {"", "s"}


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 7])
def test_seek_on_a_new_source_continues_exactly(d, batch):
    d.write("a.jsonl", lines(*[f"a{i}" for i in range(5)]))
    d.write("b.jsonl", lines(*[f"b{i}" for i in range(4)]))
    d.write("c.jsonl", b"\n\n" + lines("c0") + b"   \n" + lines("c1"))  # blank lines are skipped
    want = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(4)] + ["c0", "c1"]
    got: list[str] = []
    pos = {"format": 2, "dirs": {}, "files": {}}
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
    assert d.events == []


def test_seek_mid_file_then_appended_lines(d):
    d.write("a.jsonl", lines("1", "2", "3"))
    src = d.source()
    assert texts(src.poll(2)) == ["1", "2"]
    pos = src.position()
    assert pos["files"]["a.jsonl"]["offset"] == len(lines("1", "2"))
    d.append("a.jsonl", lines("4"))
    again = d.source()
    again.seek(pos)
    assert texts(again.poll(10)) == ["3", "4"]
    assert d.events == []


@pytest.mark.parametrize("empty", [{"format": 2, "dirs": {}, "files": {}}, {"offsets": {}}])
def test_seek_replaces_the_position(d, empty):
    d.write("a.jsonl", lines("1", "2"))
    src = d.source()
    src.poll(10)
    close_all(src)
    assert src.position()["files"] == {}
    src.seek(empty)
    assert texts(src.poll(10)) == ["1", "2"]


def test_old_position_format_is_accepted(d):
    d.write("a.jsonl", lines("1", "2", "3"))
    d.write("b.jsonl", lines("4"))
    d.write("c.jsonl", lines("5"))
    src = d.source()
    src.seek({"offsets": {"a.jsonl": len(lines("1")), "b.jsonl": len(lines("4"))}})
    assert texts(src.poll(10)) == ["2", "3", "5"]  # b was read to its end; c is new
    pos = src.position()
    assert {rel: e["offset"] for rel, e in pos["files"].items()} == {
        "a.jsonl": len(lines("1", "2", "3")), "b.jsonl": len(lines("4")), "c.jsonl": len(lines("5"))}
    assert pos["files"]["a.jsonl"]["fpn"] > 0  # identity learned at first sight
    close_all(src)
    assert src.position()["files"] == {}
    with pytest.raises(SourceError, match="position"):
        src.seek({"files": {"a.jsonl": {"no": "offset"}}})


# -- growing files and settling -----------------------------------------------------


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
    assert d.events == []


def test_final_line_without_newline_waits_for_the_settle_time(d):
    d.write("a.jsonl", lines("1") + b'{"text": "par')
    src = d.source()
    assert texts(src.poll(10)) == ["1"]
    d.append("a.jsonl", b'tial"}')
    d.clock.advance(1.5)
    assert src.poll(10) == []  # changed since the last poll: the settle time starts again
    assert src.position()["files"]["a.jsonl"]["offset"] == len(lines("1"))
    d.clock.advance(1.9)
    assert src.poll(10) == []  # unchanged for 1.9 s < settle_s
    d.clock.advance(0.1)
    assert texts(src.poll(10)) == ["partial"]  # unchanged for 2.0 s
    assert drain(src) == []


def test_settle_time_is_the_constructor_argument_and_mtime_counts(d):
    d.write("doc.txt", b"version 1")
    src = d.source(settle_s=10.0)
    assert src.poll(10) == []
    d.clock.advance(9.0)
    d.write("doc.txt", b"version 2")  # same size, new modification time: not settled
    assert src.poll(10) == []
    d.clock.advance(9.9)
    assert src.poll(10) == []
    d.clock.advance(0.1)
    assert texts(src.poll(10)) == ["version 2"]
    fresh = d.source(settle_s=0.0)  # zero: taken at first sight
    d.write("doc2.txt", b"now")
    assert texts(fresh.poll(10)) == ["version 2", "now"]


def test_final_line_completed_by_a_newline_is_delivered_without_waiting(d):
    d.write("a.jsonl", b'{"text": "x"}')
    src = d.source()
    assert src.poll(10) == []  # first sight: not settled
    d.append("a.jsonl", b"\n")
    assert texts(src.poll(10)) == ["x"]
    assert src.position()["files"]["a.jsonl"]["offset"] == len(b'{"text": "x"}\n')


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
    d.clock.advance(1.0)
    d.write("doc.txt", body.encode())
    d.clock.advance(1.5)
    assert src.poll(10) == []  # changed 1.5 s ago (as far as the source can tell)
    d.clock.advance(SETTLE)
    recs = src.poll(10)
    assert len(recs) == 1
    r = recs[0]
    assert r.kind == "txt"
    assert r.data == body.encode()
    assert r.provenance == {"file": "doc.txt", "offset": 0}
    assert r.default_id == "doc.txt"
    assert drain(src) == []
    assert src.position()["files"]["doc.txt"]["offset"] == len(body.encode())


def test_max_records_is_respected(d):
    d.write("a.jsonl", lines(*[f"a{i}" for i in range(5)]))
    d.write("b.jsonl", lines(*[f"b{i}" for i in range(5)]))
    d.write("c.txt", b"c")
    d.write("d.txt", b"d")
    src = d.source()
    src.poll(0)  # look once so the .txt files can settle
    d.clock.advance(SETTLE)
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


# -- long lines and long documents --------------------------------------------------


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
    assert src.position()["files"]["a.jsonl"]["offset"] == len(body)


def test_long_line_position_resumes_after_it(d):
    long = b'{"text": "' + b"q" * 500 + b'"}\n'
    d.write("a.jsonl", long + lines("next"))
    src = d.source(read_chunk_bytes=7, max_line_bytes=64)
    first = src.poll(1)
    assert len(first) == 1 and len(first[0].data) == 65
    fresh = d.source(read_chunk_bytes=7, max_line_bytes=64)
    fresh.seek(src.position())
    assert fresh.position()["files"]["a.jsonl"]["offset"] == len(long)
    rec = fresh.poll(10)
    assert texts(rec) == ["next"]
    assert rec[0].provenance["offset"] == len(long)


class CountingReads:
    """Wraps a source's store so that every byte it reads is counted, per file."""

    def __init__(self, src: DirectorySource):
        self.bytes: dict[str, int] = {}
        inner = src.store.open

        def open_(s):
            reader = inner(s)
            read = reader.read

            def counted(n):
                data = read(n)
                self.bytes[s.rel] = self.bytes.get(s.rel, 0) + len(data)
                return data

            reader.read = counted
            return reader

        src.store.open = open_


@pytest.mark.parametrize("cap", [10, 1000, 5000])
def test_a_txt_larger_than_the_bound_is_read_only_up_to_the_bound(d, cap):
    big = b"w" * 20_000 + b" the end"
    d.write("big.txt", big)
    d.write("small.txt", b"s" * cap)  # exactly the bound: delivered whole
    src = d.source(max_line_bytes=cap)
    reads = CountingReads(src)
    recs = drain(src)
    assert [r.provenance["file"] for r in recs] == ["big.txt", "small.txt"]
    assert recs[0].data == big[: cap + 1]
    assert reads.bytes["big.txt"] == cap + 1  # not one byte more: the rest is never read
    assert isinstance(decode(recs[0], max_doc_bytes=cap), Rejection)
    assert recs[1].data == b"s" * cap and isinstance(decode(recs[1], max_doc_bytes=cap), Document)
    assert src.position()["files"]["big.txt"]["offset"] == len(big)
    assert drain(src) == [] and reads.bytes["big.txt"] == cap + 1


# -- renamed, deleted, truncated, replaced --------------------------------------------


def test_a_file_renamed_while_read_keeps_its_offset(d):
    d.write("a.jsonl", lines(*[f"a{i}" for i in range(5)]))
    src = d.source()
    assert texts(src.poll(2)) == ["a0", "a1"]
    d.rename("a.jsonl", "b.jsonl")
    d.append("b.jsonl", lines("a5"))
    recs = src.poll(10)
    assert texts(recs) == ["a2", "a3", "a4", "a5"]  # none twice, none skipped
    assert {r.provenance["file"] for r in recs} == {"b.jsonl"}
    assert recs[0].provenance["offset"] == len(lines("a0", "a1"))
    [ev] = d.named("file_renamed")
    assert ev["from"] == "a.jsonl" and ev["to"] == "b.jsonl" and ev["file"] == "b.jsonl"
    assert ev["offset"] == len(lines("a0", "a1"))
    assert set(src.position()["files"]) == {"b.jsonl"}
    assert [n for n, _ in d.events] == ["file_renamed"]


def test_rotation_renamed_file_keeps_its_offset_and_the_new_one_is_read_whole(d):
    d.write("app.jsonl", lines("1", "2", "3"))
    src = d.source()
    assert texts(src.poll(2)) == ["1", "2"]
    d.rename("app.jsonl", "app.0001.jsonl")  # rotated away ...
    d.write("app.jsonl", lines("4", "5"))  # ... and a new file under the old name
    assert sorted(texts(drain(src))) == ["3", "4", "5"]
    assert d.named("file_renamed")[0]["to"] == "app.0001.jsonl"
    assert not d.named("file_replaced") and not d.named("file_deleted")


def test_a_file_renamed_over_another_open_file(d):
    d.write("a.jsonl", lines("a0", "a1", "a2"))
    d.write("b.jsonl", lines("b0", "b1", "b2"))
    src = d.source()
    assert texts(src.poll(4)) == ["a0", "a1", "a2", "b0"]
    d.rename("a.jsonl", "b.jsonl")  # b's content is gone, a's lives on under b's name
    d.append("b.jsonl", lines("a3"))
    assert texts(drain(src)) == ["a3"]
    assert [(n, f["file"]) for n, f in d.events] == [("file_renamed", "b.jsonl"), ("file_deleted", "b.jsonl")]
    assert d.events[0][1]["from"] == "a.jsonl"
    assert d.events[1][1]["offset"] == len(lines("b0")) and d.events[1][1]["bytes"] == len(lines("b1", "b2"))


def test_a_file_deleted_while_read_is_reported_and_the_stream_goes_on(d):
    d.write("a.jsonl", lines(*[f"a{i}" for i in range(5)]))
    d.write("b.jsonl", lines("b0"))
    src = d.source()
    assert texts(src.poll(2)) == ["a0", "a1"]
    d.delete("a.jsonl")
    assert texts(src.poll(10)) == ["b0"]
    [ev] = d.named("file_deleted")
    done = len(lines("a0", "a1"))
    assert ev["file"] == "a.jsonl" and ev["offset"] == done
    assert ev["size"] == len(lines(*[f"a{i}" for i in range(5)])) and ev["bytes"] == ev["size"] - done
    assert set(src.position()["files"]) == {"b.jsonl"}
    assert src.poll(10) == [] and len(d.named("file_deleted")) == 1


def test_a_file_deleted_between_listing_and_reading_does_not_raise(d):
    d.write("a.jsonl", lines("a0"))
    d.write("b.jsonl", lines("b0"))
    src = d.source()
    inner = src.store.open

    def open_(s):
        if s.rel == "a.jsonl" and d.fs.exists(d.path("a.jsonl")):
            d.delete("a.jsonl")
        return inner(s)

    src.store.open = open_
    assert texts(src.poll(10)) == ["b0"]
    assert src.poll(10) == []
    assert [e["file"] for e in d.named("file_deleted")] == ["a.jsonl"]


def test_a_truncated_file_goes_on_from_its_new_end(d):
    d.write("a.jsonl", lines("1", "2", "3", "4"))
    src = d.source()
    assert texts(src.poll(10)) == ["1", "2", "3", "4"]
    d.write("a.jsonl", lines("1"))  # truncated below the offset
    assert src.poll(10) == []
    [ev] = d.named("file_truncated")
    assert ev["offset"] == len(lines("1", "2", "3", "4")) and ev["size"] == len(lines("1"))
    assert ev["bytes"] == len(lines("2", "3", "4"))
    assert src.position()["files"]["a.jsonl"]["offset"] == len(lines("1"))
    d.append("a.jsonl", lines("5"))
    assert texts(drain(src)) == ["5"]  # "1" is not read again
    assert len(d.named("file_truncated")) == 1


def test_other_content_under_an_open_name_is_reported_and_not_read_again(d):
    d.write("a.jsonl", lines("1", "2"))
    src = d.source()
    assert texts(src.poll(10)) == ["1", "2"]
    replacement = lines("X1", "X2", "X3")
    d.write("a.jsonl", replacement)
    assert drain(src) == []  # never from 0 again: nothing is trained twice
    [ev] = d.named("file_replaced")
    assert ev["file"] == "a.jsonl" and ev["offset"] == len(lines("1", "2")) and ev["bytes"] == len(replacement)
    d.append("a.jsonl", lines("X4"))
    assert texts(drain(src)) == ["X4"]


def test_a_reused_name_after_close_is_not_read_again(d):
    d.write("a.jsonl", lines("1", "2"))
    d.write("b.jsonl", lines("3"))
    src = d.source()
    assert texts(src.poll(10)) == ["1", "2", "3"]
    close_all(src)
    assert src.position()["files"] == {} and src.position()["dirs"][""]["after"] == "b.jsonl"
    time.sleep(0.02)  # past the file system's timestamp granularity
    d.write("a.jsonl", lines("other", "content"))  # rewritten in place: a finished name is not looked at ...
    assert drain(src) == []
    assert d.events == []  # ... so not even noticed while the names stay the same
    d.delete("b.jsonl")
    assert src.poll(10) == []  # a name went: the names up to the watermark are looked at once
    assert [e["file"] for e in d.named("file_late")] == ["a.jsonl"]  # changed after it was finished
    time.sleep(0.02)
    d.write("b.jsonl", lines("new b"))  # deleted, then a new file under the finished name
    assert drain(src) == []
    assert [e["file"] for e in d.named("file_late")] == ["a.jsonl", "b.jsonl"]  # each once
    close_all(src)
    assert drain(src) == [] and len(d.named("file_late")) == 2


# -- watermark: late files, bounded position and listing ------------------------------


def test_late_files_are_reported_once_and_not_read(d):
    d.write("2024-01.jsonl", lines("jan"))
    d.write("2024-03.jsonl", lines("mar"))
    d.write("law/2024-01.jsonl", lines("law jan"))
    src = d.source()
    assert texts(src.poll(10)) == ["jan", "mar", "law jan"]
    close_all(src)
    pos = src.position()
    assert pos["files"] == {}
    assert pos["dirs"][""]["after"] == "2024-03.jsonl" and pos["dirs"]["law"]["after"] == "law/2024-01.jsonl"
    time.sleep(0.02)  # past the file system's timestamp granularity
    d.write("2024-02.jsonl", lines("feb"))  # sorts below the watermark: late
    d.write("2024-04.jsonl", lines("apr"))  # after it: read
    d.write("law/2023-12.jsonl", lines("law dec"))  # late in its own directory
    d.write("law/2024-02.jsonl", lines("law feb"))
    assert texts(drain(src)) == ["apr", "law feb"]
    late = d.named("file_late")
    assert sorted(e["file"] for e in late) == ["2024-02.jsonl", "law/2023-12.jsonl"]
    assert {e["file"]: e["watermark"] for e in late} == {"2024-02.jsonl": "2024-03.jsonl", "law/2023-12.jsonl": "law/2024-01.jsonl"}
    assert all(e["bytes"] == e["size"] > 0 for e in late)
    close_all(src)
    assert drain(src) == [] and len(d.named("file_late")) == 2  # once, not every poll
    again = d.source()  # nor after a restart
    again.seek(json.loads(json.dumps(src.position())))
    assert drain(again) == [] and len(d.named("file_late")) == 2


def test_files_written_out_of_order_within_close_after_s_are_not_late(d):
    d.write("b.jsonl", lines("b"))
    src = d.source()
    assert texts(src.poll(10)) == ["b"]
    d.clock.advance(CLOSE - 1)
    d.write("a.jsonl", lines("a"))  # written after b, named before it, inside the grace
    assert texts(src.poll(10)) == ["a"]
    assert d.named("file_late") == []


def test_watermark_moves_on_and_the_position_stays_small(d):
    n = 500
    for i in range(n):
        d.write(f"f{i:04d}.jsonl", lines(f"r{i}"))
    src = d.source()
    assert texts(src.poll(10_000)) == [f"r{i}" for i in range(n)]
    assert len(src.position()["files"]) == n  # all still open
    close_all(src)
    pos = src.position()
    assert pos["files"] == {} and pos["dirs"][""]["after"] == f"f{n - 1:04d}.jsonl"
    assert len(json.dumps(pos)) < 200
    stats: list[str] = []
    inner = src.store._stat
    src.store._stat = lambda rel: stats.append(rel) or inner(rel)
    d.write(f"f{n:04d}.jsonl", lines("new"))
    assert texts(src.poll(10)) == ["new"]
    assert stats == [f"f{n:04d}.jsonl"]  # no per-file work for the 500 finished ones
    stats.clear()
    assert src.poll(10) == []
    assert stats == [f"f{n:04d}.jsonl"]  # only the one still open


def test_a_backlog_is_not_passed_by_the_watermark(d):
    for i in range(6):
        d.write(f"f{i}.jsonl", lines(f"r{i}a", f"r{i}b"))
    src = d.source()
    assert texts(src.poll(5)) == ["r0a", "r0b", "r1a", "r1b", "r2a"]
    d.clock.advance(CLOSE)
    assert texts(src.poll(4)) == ["r2b", "r3a", "r3b", "r4a"]
    pos = src.position()
    assert pos["dirs"][""]["after"] == "f3.jsonl"  # f4, f5 are not read to their end: they stay listed
    assert set(pos["files"]) == {"f4.jsonl", "f5.jsonl"}
    assert texts(src.poll(10)) == ["r4b", "r5a", "r5b"]
    assert src.position()["dirs"][""]["after"] == "f5.jsonl"


def test_a_file_growing_forever_does_not_hold_the_watermark(d):
    d.write("a.jsonl", lines("a0"))
    src = d.source()
    assert texts(src.poll(10)) == ["a0"]
    for i in range(1, 5):
        d.clock.advance(CLOSE / 2)
        d.write(f"b{i}.jsonl", lines(f"b{i}"))
        d.append("a.jsonl", lines(f"a{i}"))
        assert texts(src.poll(10)) == [f"a{i}", f"b{i}"]
    pos = src.position()
    assert pos["dirs"][""]["after"] == "b2.jsonl"  # b1, b2: first seen close_after_s ago
    assert set(pos["files"]) == {"a.jsonl", "b3.jsonl", "b4.jsonl"}  # a: below the watermark, still open
    d.append("a.jsonl", lines("a5"))
    assert texts(src.poll(10)) == ["a5"]
    assert d.named("file_late") == []


# -- transient failures ---------------------------------------------------------------


def test_a_listing_failure_is_source_unavailable_and_nothing_is_skipped(d):
    d.write("a.jsonl", lines("1", "2"))
    src = d.source()
    inner = src.store.list
    failures = [ConnectionResetError("connection reset by peer"), TimeoutError("timed out"), OSError(5, "I/O error")]

    def flaky(*a, **kw):
        if failures:
            raise failures.pop(0)
        return inner(*a, **kw)

    src.store.list = flaky
    before = src.position()
    for _ in range(3):
        with pytest.raises(SourceUnavailable):
            src.poll(10)
        assert src.position() == before
    assert texts(src.poll(10)) == ["1", "2"]


def test_a_read_failure_delivers_exactly_the_rest_later(d):
    d.write("a.jsonl", lines(*[f"a{i}" for i in range(6)]))
    d.write("b.jsonl", lines(*[f"b{i}" for i in range(3)]))
    src = d.source(read_chunk_bytes=16)
    inner = src.store.open
    calls = {"n": 0}
    broken = {"on": True}

    def open_(s):
        reader = inner(s)
        read = reader.read

        def flaky(n):
            calls["n"] += 1
            if broken["on"] and calls["n"] % 5 in (0, 1):  # two in a row: one cuts a poll short, the next fails one
                raise ConnectionResetError("reset")
            return read(n)

        reader.read = flaky
        return reader

    src.store.open = open_
    got, raised, short = [], 0, 0
    for _ in range(100):
        try:
            recs = src.poll(3)
        except SourceUnavailable:
            raised += 1
            continue
        short += 0 < len(recs) < 3 and len(got) + len(recs) < 6
        got += texts(recs)
        if len(got) >= 9:
            break
    assert raised > 0 and short > 0
    assert got == [f"a{i}" for i in range(6)] + [f"b{i}" for i in range(3)]  # none twice, none skipped
    broken["on"] = False
    assert drain(src) == []


def test_a_failure_on_open_raises_and_keeps_the_position(d):
    d.write("a.jsonl", lines("1", "2"))
    src = d.source()
    inner = src.store.open
    fail = [True]

    def open_(s):
        if fail[0]:
            raise OSError(104, "Connection reset by peer")
        return inner(s)

    src.store.open = open_
    with pytest.raises(SourceUnavailable, match="reading a.jsonl"):
        src.poll(10)
    assert src.position()["files"]["a.jsonl"]["offset"] == 0
    fail[0] = False
    assert texts(src.poll(10)) == ["1", "2"]


def test_a_permanent_storage_error_is_a_source_error_not_unavailable(d):
    src = d.source()

    def denied(*a, **kw):
        raise PermissionError("access denied")

    src.store.list = denied
    with pytest.raises(SourceError) as e:
        src.poll(10)
    assert not isinstance(e.value, SourceUnavailable)


def test_an_events_callback_that_fails_does_not_stop_the_stream(d):
    d.write("a.jsonl", lines("1"))
    d.write("b.jsonl", lines("2"))

    def boom(name, fields):
        raise RuntimeError("callback bug")

    src = d.source(events=boom)
    assert texts(src.poll(1)) == ["1"]
    d.delete("a.jsonl")
    assert texts(src.poll(10)) == ["2"]


# -- compressed files (.gz, .zst) -----------------------------------------------------


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


PACK = {"gz": gz, "zst": zst}


def zst_blocks(parts: list[bytes]) -> bytes:
    """One zstd frame, a block per part: a cut in the middle leaves the blocks before it decodable."""
    c = zstandard.ZstdCompressor().compressobj()
    out = [c.compress(p) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for p in parts]
    return b"".join(out) + c.flush()


def _same_records(plain: list, packed: list, rel: str, packed_rel: str) -> None:
    assert packed and len(packed) == len(plain)
    for p, c in zip(plain, packed, strict=True):
        assert (c.data, c.kind, c.default_domain) == (p.data, p.kind, p.default_domain)
        assert c.provenance == {**p.provenance, "file": packed_rel}  # offsets: decompressed bytes, as in the plain file
        assert c.default_id == p.default_id.replace(rel, packed_rel, 1)


@pytest.mark.parametrize("chunk", [3, 64, 1 << 20])
@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_a_compressed_file_yields_the_records_of_the_plain_file(d, codec, chunk):
    cap = 64
    long = json.dumps({"id": "long", "text": "z" * 300}).encode()
    body = lines("a", "b") + b"\n  \n" + long + b"\n" + lines("c") + b'{"id": "last", "text": "no newline"}'
    doc, big = "un document\nà deux lignes".encode(), b"w" * 500
    for name, data in [("j", body), ("t", doc), ("u", big)]:
        kind = "jsonl" if name == "j" else "txt"
        d.write(f"law/{name}.{kind}", data)
        d.write(f"law/{name}.{kind}.{codec}", PACK[codec](data))
    src = d.source(read_chunk_bytes=chunk, max_line_bytes=cap)
    recs = drain(src)
    by_file: dict[str, list] = {}
    for r in recs:
        by_file.setdefault(r.provenance["file"], []).append(r)
    assert len(by_file) == 6
    for rel in ("law/j.jsonl", "law/t.txt", "law/u.txt"):
        _same_records(by_file[rel], by_file[f"{rel}.{codec}"], rel, f"{rel}.{codec}")
    assert texts(by_file[f"law/j.jsonl.{codec}"][:2]) == ["a", "b"] and len(by_file[f"law/j.jsonl.{codec}"]) == 5
    assert by_file[f"law/u.txt.{codec}"][0].data == big[: cap + 1]  # cut as a plain .txt is
    assert drain(src) == [] and d.events == []  # each once


def test_a_compressed_files_position_counts_decompressed_bytes(d):
    body = lines("1", "2", "3")
    d.write("a.jsonl.gz", gz(body))
    src = d.source(settle_s=0.0)
    assert texts(src.poll(2)) == ["1", "2"]
    entry = src.position()["files"]["a.jsonl.gz"]
    size = len(gz(body))
    assert entry["offset"] == len(lines("1", "2")) and entry["size"] == size and "end" not in entry
    assert entry["fpn"] == size and entry["fp"] == fingerprint(gz(body))  # the identity: its compressed bytes
    assert texts(src.poll(10)) == ["3"]
    assert src.position()["files"]["a.jsonl.gz"] == {**entry, "offset": len(body), "end": True}
    assert json.loads(json.dumps(src.position())) == src.position()


def test_multi_member_gzip_and_multi_frame_zstd(d):
    d.write("a.jsonl.gz", gz(lines("a1", "a2")) + gz(b"") + gz(lines("a3")) + b"\0" * 8 + gz(lines("a4")) + b"\0\0")
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    checked = zstandard.ZstdCompressor(write_checksum=True).compress(lines("b2", "b3"))  # as the zstd command writes
    d.write("b.jsonl.zst", zst(lines("b1")) + skippable + checked + zst_blocks([lines("b4"), lines("b5")]))
    for chunk in (5, 1 << 20):
        assert texts(drain(d.source(read_chunk_bytes=chunk))) == ["a1", "a2", "a3", "a4", "b1", "b2", "b3", "b4", "b5"]
    assert d.events == []


@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_a_compressed_file_resumes_from_a_checkpointed_position(d, codec, batch):
    a = [f"a{i}" for i in range(25)]
    d.write(f"a.jsonl.{codec}", PACK[codec](lines(*a)))
    d.write(f"b.txt.{codec}", PACK[codec](b"the b document"))
    d.write("c.jsonl", lines("c0"))
    want = a + ["the b document", "c0"]
    got: list[str] = []
    pos = {"format": 2, "dirs": {}, "files": {}}
    for _ in range(60):  # a fresh source (a restart) after every poll, settled by then
        src = d.source(read_chunk_bytes=16, max_line_bytes=64, settle_s=0.0)
        src.seek(json.loads(json.dumps(pos)))
        recs = src.poll(batch)
        assert len(recs) <= batch
        got += texts(recs)
        pos = src.position()
        if len(got) >= len(want):
            break
    assert got == want  # each once, in order
    assert pos["files"][f"a.jsonl.{codec}"]["offset"] == len(lines(*a)) and pos["files"][f"a.jsonl.{codec}"]["end"]
    again = d.source(settle_s=0.0)
    again.seek(pos)
    assert drain(again) == [] and d.events == []


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_a_big_compressed_file_is_read_in_bounded_memory(tmp_path, codec):
    root = tmp_path / "stream"
    root.mkdir()
    row = json.dumps({"id": "r", "text": "abc " * 250}).encode() + b"\n"
    n = 20_000  # 20 MB decompressed, some 100 KB compressed
    (root / f"big.jsonl.{codec}").write_bytes(PACK[codec](row * n))
    chunk = 1 << 16
    src = DirectorySource(f"file://{root}", read_chunk_bytes=chunk, max_line_bytes=chunk, settle_s=0.0)
    asked, got = [], [0]
    inner = src.store.open

    def open_(s):
        reader = inner(s)
        read = reader.read

        def counted(k):
            asked.append(k)
            data = read(k)
            got[0] += len(data)
            return data

        reader.read = counted
        return reader

    src.store.open = open_
    count, offset = 0, 0
    tracemalloc.start()
    try:
        for _ in range(100):
            recs = src.poll(1000)
            if not recs:
                break
            for r in recs:  # every record whole, at its decompressed offset
                assert r.data == row[:-1] and r.provenance["offset"] == offset
                offset += len(row)
            count += len(recs)
            del recs
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 4 << 20, f"peak {peak} bytes while decompressing {n * len(row)}"
    assert max(asked) <= chunk  # never more than a chunk from the store
    assert got[0] == (root / f"big.jsonl.{codec}").stat().st_size  # read once: each poll reads on where the last stopped
    assert src.position()["files"][f"big.jsonl.{codec}"]["end"] is True


def test_a_damaged_gzip_delivers_what_came_before_and_is_reported_once(d):
    members = [lines(*[f"m{k}-{i}" for i in range(20)]) for k in range(6)]
    packed = [gz(m) for m in members]
    data = bytearray(b"".join(packed))
    middle = sum(map(len, packed[:3])) + len(packed[3]) // 2
    data[middle : middle + 6] = bytes(b ^ 0xA5 for b in data[middle : middle + 6])  # bytes flipped inside member 3
    d.write("a.jsonl.gz", bytes(data))
    d.write("b.jsonl", lines("b0"))
    src = d.source(read_chunk_bytes=64)
    got = texts(drain(src))
    assert got[0] == "b0"  # the plain file is read at once, the compressed one once settled: the stream goes on
    before = [f"m{k}-{i}" for k in range(3) for i in range(20)]
    assert got[1 : len(before) + 1] == before  # the members before the damage, each record once
    assert "m4-0" not in got  # nothing after the damage
    [ev] = d.named("file_corrupt")
    assert ev["file"] == "a.jsonl.gz" and ev["size"] == len(data) and "gzip" in ev["error"]
    assert ev["offset"] >= len(b"".join(members[:3])) and 0 < ev["bytes"] < len(data) - sum(map(len, packed[:3]))
    assert src.position()["files"]["a.jsonl.gz"]["end"] is True
    assert drain(src) == [] and len(d.named("file_corrupt")) == 1  # not read again
    again = d.source()
    again.seek(src.position())
    assert drain(again) == [] and len(d.named("file_corrupt")) == 1


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_a_truncated_compressed_file_delivers_the_records_before_the_cut(d, codec):
    parts = [lines(*[f"p{k}-{i}" for i in range(10)]) for k in range(8)]
    data = zst_blocks(parts) if codec == "zst" else b"".join(gz(p) for p in parts)
    cut = data[: len(data) * 5 // 8 + 7]  # inside a member, a block
    d.write(f"a.jsonl.{codec}", cut)
    d.write("b.jsonl", lines("b0"))
    src = d.source(read_chunk_bytes=32)
    got = texts(drain(src))
    assert got[0] == "b0"  # read at once; the compressed file once settled
    delivered = got[1:]
    assert delivered == [f"p{k}-{i}" for k in range(8) for i in range(10)][: len(delivered)]  # a prefix, none garbled
    assert 20 <= len(delivered) < 80
    [ev] = d.named("file_corrupt")
    assert ev["file"] == f"a.jsonl.{codec}" and "cut short" in ev["error"] and ev["bytes"] == 0
    assert ev["offset"] == len(b"".join(parts)[: ev["offset"]]) == len(lines(*[f"p{k}-{i}" for k in range(8) for i in range(10)][: len(delivered)]))
    assert drain(src) == [] and len(d.named("file_corrupt")) == 1


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_a_garbage_compressed_file_and_an_empty_one(d, codec):
    d.write(f"a.jsonl.{codec}", b"this is not compressed at all\n")
    d.write(f"b.txt.{codec}", b"")  # nothing yet: not an error
    d.write(f"c.txt.{codec}", PACK[codec](b""))  # an empty document: no record, as for an empty .txt
    d.write("d.jsonl", lines("d0"))
    src = d.source()
    assert texts(drain(src)) == ["d0"]
    assert [e["file"] for e in d.named("file_corrupt")] == [f"a.jsonl.{codec}"]
    assert d.named("file_corrupt")[0]["offset"] == 0
    d.write(f"b.txt.{codec}", PACK[codec](b"now it has one"))
    assert texts(drain(src)) == ["now it has one"]


def test_a_compressed_file_is_read_only_once_settled(d):
    body = lines(*[f"g{i}" for i in range(40)])
    data = gz(body)
    d.write("a.jsonl.gz", data[: len(data) // 2])  # still being written
    d.write("b.jsonl", lines("b0"))
    src = d.source()
    reads = CountingReads(src)
    assert texts(src.poll(100)) == ["b0"]
    d.clock.advance(SETTLE - 0.5)
    d.write("a.jsonl.gz", data)  # the rest, SETTLE - 0.5 s later
    assert src.poll(100) == []
    d.clock.advance(SETTLE - 0.5)
    assert src.poll(100) == []  # changed SETTLE - 0.5 s ago
    assert "a.jsonl.gz" not in reads.bytes  # not opened while unsettled
    d.clock.advance(0.5)
    assert texts(src.poll(100)) == [f"g{i}" for i in range(40)]
    assert d.events == []
    d.append("a.jsonl.gz", gz(lines("more")))  # finished: a change now is other content, never read
    assert drain(src) == []
    [ev] = d.named("file_replaced")
    assert ev["file"] == "a.jsonl.gz" and ev["offset"] == len(body)


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_a_compressed_file_renamed_while_read_keeps_its_offset(d, codec):
    d.write(f"a.jsonl.{codec}", PACK[codec](lines(*[f"a{i}" for i in range(6)])))
    src = d.source(settle_s=0.0)
    assert texts(src.poll(2)) == ["a0", "a1"]
    d.rename(f"a.jsonl.{codec}", f"b.jsonl.{codec}")
    recs = src.poll(10)
    assert texts(recs) == ["a2", "a3", "a4", "a5"]
    assert recs[0].provenance == {"file": f"b.jsonl.{codec}", "offset": len(lines("a0", "a1"))}
    assert [n for n, _ in d.events] == ["file_renamed"]


@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_a_read_failure_in_a_compressed_file_delivers_exactly_the_rest_later(d, codec):
    d.write(f"a.jsonl.{codec}", PACK[codec](lines(*[f"a{i}" for i in range(30)])))
    d.write("b.jsonl", lines("b0"))
    src = d.source(read_chunk_bytes=16, settle_s=0.0)
    inner = src.store.open
    calls = {"n": 0}

    def open_(s):
        reader = inner(s)
        read = reader.read

        def flaky(n):
            calls["n"] += 1
            if calls["n"] % 4 == 0:
                raise ConnectionResetError("reset")
            return read(n)

        reader.read = flaky
        return reader

    src.store.open = open_
    got, raised = [], 0
    for _ in range(200):
        try:
            recs = src.poll(4)
        except SourceUnavailable:
            raised += 1
            continue
        got += texts(recs)
        if len(got) >= 31:
            break
    assert raised > 0
    assert got == [f"a{i}" for i in range(30)] + ["b0"]  # none twice, none skipped
    assert d.named("file_corrupt") == []
