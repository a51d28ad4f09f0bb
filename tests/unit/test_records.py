"""daemon/records.py decode and daemon/deadletter.py DeadLetterSink."""

import base64
import hashlib
import json

import pytest

from everlearn.daemon.deadletter import DeadLetterSink
from everlearn.daemon.records import Document, RawRecord, Rejection, decode

pytestmark = pytest.mark.unit

PROV = {"file": "d/a.jsonl", "offset": 120}


def raw(data: bytes | str, kind: str = "jsonl", default_id: str = "d/a.jsonl@120", default_domain: str = "d") -> RawRecord:
    if isinstance(data, str):
        data = data.encode()
    return RawRecord(data, kind, dict(PROV), default_id, default_domain)


# -- decode: documents -----------------------------------------------------------------


def test_full_object_becomes_a_document():
    doc = decode(raw('{"id": "x1", "text": "hello", "domain": "news", "extra": 1}'), 1000)
    assert doc == Document("x1", "hello", "news", PROV)


def test_id_and_domain_default_from_the_record():
    doc = decode(raw('{"text": "hello"}'), 1000)
    assert isinstance(doc, Document)
    assert (doc.id, doc.domain, doc.text) == ("d/a.jsonl@120", "d", "hello")
    assert doc.provenance == PROV


def test_integer_id_becomes_a_string():
    doc = decode(raw('{"id": 7, "text": "t"}'), 1000)
    assert isinstance(doc, Document) and doc.id == "7"


def test_unicode_text_is_kept():
    text = "Grüße, 世界 — ✓"
    doc = decode(raw(json.dumps({"text": text}, ensure_ascii=False)), 1000)
    assert isinstance(doc, Document) and doc.text == text


def test_txt_record_is_the_whole_text():
    body = "line 1\n\nline 3\n"
    doc = decode(raw(body, kind="txt", default_id="law/x.txt", default_domain="law"), 1000)
    assert doc == Document("law/x.txt", body, "law", PROV)


def test_size_exactly_at_the_limit_is_accepted():
    data = '{"text": "abc"}'
    assert isinstance(decode(raw(data), len(data)), Document)


# -- decode: rejections --------------------------------------------------------------


@pytest.mark.parametrize(
    "data, kind, reason",
    [
        (b'{"text": "\xff\xfe"}', "jsonl", "bad_utf8"),
        (b"\xc3\x28 plain", "txt", "bad_utf8"),
        (b'{"text": "unterminated', "jsonl", "bad_json"),
        (b"not json at all", "jsonl", "bad_json"),
        (b'["a", "list"]', "jsonl", "not_an_object"),
        (b'"a string"', "jsonl", "not_an_object"),
        (b"42", "jsonl", "not_an_object"),
        (b"null", "jsonl", "not_an_object"),
        (b'{"id": "x"}', "jsonl", "missing_text"),
        (b'{"text": ""}', "jsonl", "missing_text"),
        (b'{"text": "  \\n\\t "}', "jsonl", "missing_text"),
        (b'{"text": 5}', "jsonl", "missing_text"),
        (b'{"text": ["a"]}', "jsonl", "missing_text"),
        (b"", "txt", "empty"),
        (b" \n\t\n", "txt", "empty"),
        (b'{"text": "t", "id": 1.5}', "jsonl", "bad_field"),
        (b'{"text": "t", "id": null}', "jsonl", "bad_field"),
        (b'{"text": "t", "id": ["a"]}', "jsonl", "bad_field"),
        (b'{"text": "t", "domain": ""}', "jsonl", "bad_field"),
        (b'{"text": "t", "domain": 3}', "jsonl", "bad_field"),
        (b'{"text": "t", "domain": null}', "jsonl", "bad_field"),
    ],
)
def test_rejections(data, kind, reason):
    r = raw(data, kind=kind)
    rej = decode(r, 1000)
    assert isinstance(rej, Rejection)
    assert rej.reason == reason
    assert rej.detail
    assert rej.record is r


def test_too_large_is_checked_first():
    r = raw(b"\xff" * 11)  # also not UTF-8: size wins
    rej = decode(r, 10)
    assert isinstance(rej, Rejection) and rej.reason == "too_large"
    assert "11 bytes > source.max_doc_bytes=10" in rej.detail


def test_bad_utf8_detail_names_the_byte():
    rej = decode(raw(b'{"text": "ok \xff"}'), 1000)
    assert isinstance(rej, Rejection) and "at byte 13" in rej.detail


def test_decode_never_raises_on_garbage():
    import random

    rng = random.Random(0)
    for _ in range(500):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        for kind in ("jsonl", "txt"):
            assert isinstance(decode(raw(data, kind=kind), 30), Document | Rejection)


# -- decode: weights (buffer.weight_field) ---------------------------------------------


@pytest.mark.parametrize(
    "value, weight",
    [("2", 2.0), ("0.25", 0.25), ("0", 0.0), ("0.0", 0.0), ("1e300", 1e300), ("7", 7.0)],
)
def test_weight_field_becomes_the_document_weight(value, weight):
    doc = decode(raw(f'{{"id": "x", "text": "t", "domain": "news", "quality": {value}}}'), 1000, weight_field="quality")
    assert doc == Document("x", "t", "news", PROV, weight)
    assert type(doc.weight) is float


@pytest.mark.parametrize("data", ['{"text": "t"}', '{"text": "t", "quality": null}', '{"text": "t", "score": 3}'])
def test_missing_or_null_weight_is_none(data):
    doc = decode(raw(data), 1000, weight_field="quality")
    assert isinstance(doc, Document) and doc.weight is None


@pytest.mark.parametrize("data", ['{"text": "t", "quality": 3}', '{"text": "t", "quality": "high"}', '{"text": "t", "quality": -1}'])
def test_without_weight_field_the_field_is_ignored(data):
    doc = decode(raw(data), 1000)
    assert doc == Document("d/a.jsonl@120", "t", "d", PROV)
    assert doc.weight is None


def test_txt_records_have_no_weight():
    doc = decode(raw("some text", kind="txt"), 1000, weight_field="quality")
    assert isinstance(doc, Document) and doc.weight is None


@pytest.mark.parametrize(
    "value",
    ["true", "false", '"2"', '"high"', "-1", "-0.5", "Infinity", "-Infinity", "NaN", "1e999", "[1]", '{"v": 1}'],
)
def test_bad_weights_are_rejected_naming_the_field(value):
    r = raw(f'{{"text": "t", "quality": {value}}}')
    rej = decode(r, 1000, weight_field="quality")
    assert isinstance(rej, Rejection)
    assert rej.reason == "bad_weight"
    assert "'quality'" in rej.detail and "buffer.weight_field" in rej.detail
    assert rej.record is r


def test_an_integer_weight_too_large_for_a_float_is_rejected_not_raised():
    r = raw('{"text": "t", "quality": 1' + "0" * 400 + "}")  # valid JSON, larger than any float
    rej = decode(r, 1000, weight_field="quality")
    assert isinstance(rej, Rejection) and rej.reason == "bad_weight"


def test_other_checks_come_before_the_weight():
    # a record with a bad field and a bad weight is rejected for the field
    rej = decode(raw('{"text": "t", "domain": 3, "quality": -1}'), 1000, weight_field="quality")
    assert isinstance(rej, Rejection) and rej.reason == "bad_field"


# -- dead-letter sink ----------------------------------------------------------------


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sink_writes_one_line_per_rejection(tmp_path):
    path = tmp_path / "sub" / "dead_letter.jsonl"  # parent created
    sink = DeadLetterSink(path, clock=lambda: 1234.5)
    assert sink.count == 0
    rejections = [decode(raw(b"nope"), 1000), decode(raw(b"[1]"), 1000)]
    sink.write(rejections)
    assert sink.count == 2
    rows = _read(path)
    assert len(rows) == 2
    first = rows[0]
    assert first == {
        "ts": 1234.5,
        "reason": "bad_json",
        "detail": rejections[0].detail,
        "provenance": PROV,
        "size": 4,
        "sha256": hashlib.sha256(b"nope").hexdigest(),
        "raw": "nope",
        "raw_encoding": "utf-8",
        "raw_truncated": False,
    }
    assert rows[1]["reason"] == "not_an_object" and rows[1]["raw"] == "[1]"


def test_sink_appends_and_counts_across_writes(tmp_path):
    path = tmp_path / "dl.jsonl"
    sink = DeadLetterSink(path)
    sink.write([decode(raw(b"x"), 1000)])
    sink.write([])  # nothing: no line, no count
    sink.write([decode(raw(b"y"), 1000), decode(raw(b"z"), 1000)])
    assert sink.count == 3
    assert [r["raw"] for r in _read(path)] == ["x", "y", "z"]
    again = DeadLetterSink(path)  # a restart appends to the same file
    again.write([decode(raw(b"w"), 1000)])
    assert [r["raw"] for r in _read(path)] == ["x", "y", "z", "w"]


def test_sink_without_rejections_creates_no_file(tmp_path):
    path = tmp_path / "dl.jsonl"
    DeadLetterSink(path).write([])
    assert not path.exists()


def test_sink_non_utf8_is_base64(tmp_path):
    data = b'{"text": "\xff\xfe\x00"}'
    sink = DeadLetterSink(tmp_path / "dl.jsonl")
    sink.write([decode(raw(data), 1000)])
    (row,) = _read(tmp_path / "dl.jsonl")
    assert row["reason"] == "bad_utf8"
    assert row["raw_encoding"] == "base64"
    assert base64.b64decode(row["raw"]) == data
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert row["size"] == len(data)


def test_sink_truncates_raw_but_hashes_everything(tmp_path):
    data = b'{"text": "' + b"a" * 5000 + b'"}'
    sink = DeadLetterSink(tmp_path / "dl.jsonl", keep_bytes=100)
    sink.write([decode(raw(data), 1000)])
    (row,) = _read(tmp_path / "dl.jsonl")
    assert row["reason"] == "too_large"
    assert row["raw"] == data[:100].decode()
    assert row["raw_truncated"] is True
    assert row["size"] == len(data)
    assert row["sha256"] == hashlib.sha256(data).hexdigest()


def test_sink_exactly_keep_bytes_is_not_truncated(tmp_path):
    sink = DeadLetterSink(tmp_path / "dl.jsonl", keep_bytes=4)
    sink.write([decode(raw(b"abcd"), 1000)])
    (row,) = _read(tmp_path / "dl.jsonl")
    assert row["raw"] == "abcd" and row["raw_truncated"] is False


def test_sink_truncation_inside_a_multibyte_character_stays_text(tmp_path):
    data = ("é" * 10).encode()  # 20 bytes, 2 per character
    sink = DeadLetterSink(tmp_path / "dl.jsonl", keep_bytes=5)
    sink.write([Rejection("too_large", "x", raw(data))])
    (row,) = _read(tmp_path / "dl.jsonl")
    assert row["raw_encoding"] == "utf-8"
    assert row["raw"] == "éé"
    assert row["raw_truncated"] is True
