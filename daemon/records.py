"""What flows from a source into the pipeline: raw records, decoded documents, rejections."""

import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from everlearn.daemon.record_fields import (
    Invalid,
    check_unicode,
    source_text,
    valid_domain,
    valid_id,
    weight,
)

MAX_DEPTH = 64  # JSON nesting a record may have; json.loads recurses per level, and no document needs more


@dataclass(frozen=True)
class RawRecord:
    """Bytes as a source delivered them, with where they came from."""

    data: bytes
    kind: str  # "jsonl" (one JSON object) or "txt" (one whole document)
    provenance: dict[str, Any]  # e.g. {"file": "a.jsonl", "line": 3, "offset": 120}
    default_id: str  # id to use when the record names none
    default_domain: str
    # an id / domain the source read outside the record (a Kafka key or header): it wins over the record's fields
    fixed_id: str | bytes | None = None
    fixed_domain: str | bytes | None = None


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    domain: str
    provenance: dict[str, Any] = field(default_factory=dict)
    weight: float | None = None  # replay weight from the record's ``buffer.weight_field``, if it has one


@dataclass(frozen=True)
class Rejection:
    """A record that cannot become a document; it goes to the dead-letter sink.

    ``reason`` is short and stable (a metric label and what operators grep for):

    - ``too_large``: the record has more than ``source.max_doc_bytes`` bytes.
    - ``bad_utf8``: the bytes are not UTF-8.
    - ``empty``: a txt record with no text but whitespace.
    - ``too_deep``: the JSON nests more than ``MAX_DEPTH`` (64) levels.
    - ``bad_json``: not JSON at all.
    - ``not_an_object``: JSON, but not an object.
    - ``missing_text``: no non-empty string field ``text``.
    - ``bad_unicode``: a lone UTF-16 surrogate (an unpaired ``\\ud800``-``\\udfff`` escape) in the text, id or domain.
    - ``bad_field``: an id that is not a string or integer, or longer than ``MAX_ID_CHARS`` (1024);
      a domain that is not a non-empty string of at most ``MAX_DOMAIN_CHARS`` (128) characters without control characters.
    - ``bad_weight``: the ``buffer.weight_field`` value is not a finite number >= 0.
    - ``internal_error``: decoding itself failed (a bug); the record is kept rather than the stream stopped.

    ``detail`` says what was wrong and where, for a person to fix the producer.
    """

    reason: str
    detail: str
    record: RawRecord


REASONS = frozenset({
    "too_large", "bad_utf8", "empty", "too_deep", "bad_json", "not_an_object", "missing_text",
    "bad_unicode", "bad_field", "bad_weight", "internal_error",
})


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string literal, escapes included
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
def _check_size(data: bytes, max_doc_bytes: int) -> None:
    """Refuse big records first, before any work on them is spent."""
    if len(data) > max_doc_bytes:
        raise Invalid("too_large", f"{len(data)} bytes > source.max_doc_bytes={max_doc_bytes}")


def _utf8(data: bytes) -> str:
    """The record as text; strict UTF-8, so the text holds no lone surrogates."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid("bad_utf8", f"not UTF-8 at byte {e.start}: {e.reason}") from None


def _nesting_depth(text: str) -> int:
    """How deep the JSON nests, found without parsing (json.loads recurses per level and raises RecursionError when deep).

    Brackets inside string literals do not count. Linear time, in C: str.count, re.sub, accumulate.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # too few openers to be deep: the common case costs two scans
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _too_deep(depth: int | None) -> Invalid:
    """The rejection for a record nested beyond MAX_DEPTH (``depth`` None: the parser ran out of stack first)."""
    found = f"{depth} levels" if depth is not None else "too many levels for the parser"
    return Invalid("too_deep", (
        f"the JSON nests {found}, more than the {MAX_DEPTH} a record may have; "
        "flatten the record (put deeply nested data into a string field)"
    ))


def _parse_object(text: str) -> dict[str, Any]:
    """The record's JSON object; checks the nesting first, so a deep record is refused without recursing into it."""
    depth = _nesting_depth(text)
    if depth > MAX_DEPTH:
        raise _too_deep(depth)
    try:
        obj = json.loads(text)
    except RecursionError:  # cannot happen below MAX_DEPTH unless the stack is already deep; refused all the same
        raise _too_deep(None) from None
    except ValueError as e:
        raise Invalid("bad_json", f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise Invalid("not_an_object", f"expected a JSON object {{\"id\", \"text\", \"domain\"?}}, got {type(obj).__name__}")
    return obj


def _text_field(obj: dict[str, Any]) -> str:
    """The document's text: a non-empty string the tokenizer can encode."""
    body = obj.get("text")
    if not isinstance(body, str) or not body.strip():
        raise Invalid("missing_text", "the object has no non-empty string field 'text'")
    check_unicode(body, "field 'text'")
    return body


_DEFAULT_ID = "the source's default id (from the file name, or topic:partition:offset)"
_DEFAULT_DOMAIN = "the source's default domain (source.default_domain, the subdirectory or the topic name)"
_FIXED_ID = "the id the source read beside the record (source.kafka.id_from)"
_FIXED_DOMAIN = "the domain the source read beside the record (source.kafka.domain_from)"


def _id(raw: RawRecord, obj: dict[str, Any] | None) -> str:
    if raw.fixed_id is not None:
        return valid_id(source_text(raw.fixed_id, _FIXED_ID), _FIXED_ID)
    if obj is not None and "id" in obj:
        return valid_id(obj["id"], "field 'id'")
    return valid_id(raw.default_id, _DEFAULT_ID)


def _domain(raw: RawRecord, obj: dict[str, Any] | None) -> str:
    if raw.fixed_domain is not None:
        return valid_domain(source_text(raw.fixed_domain, _FIXED_DOMAIN), _FIXED_DOMAIN)
    if obj is not None and "domain" in obj:
        return valid_domain(obj["domain"], "field 'domain'")
    return valid_domain(raw.default_domain, _DEFAULT_DOMAIN)


def _decode(raw: RawRecord, max_doc_bytes: int, weight_field: str | None) -> Document:
    """The checks in order (the first that fails names the rejection); raises Invalid."""
    _check_size(raw.data, max_doc_bytes)
    text = _utf8(raw.data)
    if raw.kind == "txt":  # one whole document; its id and domain come from the source, checked like a record's
        if not text.strip():
            raise Invalid("empty", "the document has no text")
        return Document(_id(raw, None), text, _domain(raw, None), raw.provenance)
    obj = _parse_object(text)
    body = _text_field(obj)
    return Document(_id(raw, obj), body, _domain(raw, obj), raw.provenance, weight(obj, weight_field))


def _describe(error: Exception) -> str:
    """An unexpected exception as a detail line; str() of a broken exception may itself fail."""
    try:
        message = str(error)[:300]
    except Exception:
        message = "(unprintable message)"
    return f"{type(error).__name__}: {message} (a bug in record decoding: please report it with this record)"


def decode(raw: RawRecord, max_doc_bytes: int, weight_field: str | None = None) -> Document | Rejection:
    """Validate one record: size, UTF-8, JSON shape, and its weight when ``weight_field`` names one.

    Total by design: whatever the record holds, the result is a Document that
    tokenizes, hashes and labels, or a Rejection with a reason from REASONS.
    Even a bug in the checks becomes an ``internal_error`` rejection, so no
    record can stop the stream.
    """
    try:
        return _decode(raw, max_doc_bytes, weight_field)
    except Invalid as e:
        return Rejection(e.reason, e.detail, raw)
    except Exception as e:  # the last resort: dead-letter the record, keep the stream
        return Rejection("internal_error", _describe(e), raw)
