"""What flows from a source into the pipeline: raw records, decoded documents, rejections."""

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RawRecord:
    """Bytes as a source delivered them, with where they came from."""

    data: bytes
    kind: str  # "jsonl" (one JSON object) or "txt" (one whole document)
    provenance: dict[str, Any]  # e.g. {"file": "a.jsonl", "line": 3, "offset": 120}
    default_id: str  # id to use when the record names none
    default_domain: str


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    domain: str
    provenance: dict[str, Any] = field(default_factory=dict)
    weight: float | None = None  # replay weight from the record's ``buffer.weight_field``, if it has one


@dataclass(frozen=True)
class Rejection:
    """A record that cannot become a document; it goes to the dead-letter sink."""

    reason: str  # short, stable: bad_utf8, bad_json, not_an_object, missing_text, bad_field, bad_weight, too_large, empty
    detail: str
    record: RawRecord


def _as_weight(value: Any) -> float | None:
    """``value`` as a replay weight (a finite float >= 0), or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        weight = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return weight if 0 <= weight < math.inf else None  # NaN fails both comparisons


def decode(raw: RawRecord, max_doc_bytes: int, weight_field: str | None = None) -> Document | Rejection:
    """Validate one record: size, UTF-8, JSON shape, and its weight when ``weight_field`` names one; never raises on bad input."""
    if len(raw.data) > max_doc_bytes:
        return Rejection("too_large", f"{len(raw.data)} bytes > source.max_doc_bytes={max_doc_bytes}", raw)
    try:
        text = raw.data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejection("bad_utf8", f"not UTF-8 at byte {e.start}: {e.reason}", raw)
    if raw.kind == "txt":
        if not text.strip():
            return Rejection("empty", "the document has no text", raw)
        return Document(raw.default_id, text, raw.default_domain, raw.provenance)
    try:
        obj = json.loads(text)
    except ValueError as e:
        return Rejection("bad_json", f"not JSON: {e}", raw)
    if not isinstance(obj, dict):
        return Rejection("not_an_object", f"expected a JSON object {{\"id\", \"text\", \"domain\"?}}, got {type(obj).__name__}", raw)
    body = obj.get("text")
    if not isinstance(body, str) or not body.strip():
        return Rejection("missing_text", "the object has no non-empty string field 'text'", raw)
    doc_id = obj.get("id", raw.default_id)
    domain = obj.get("domain", raw.default_domain)
    if not isinstance(doc_id, str | int) or not isinstance(domain, str) or not domain:
        return Rejection("bad_field", "'id' must be a string or integer and 'domain' a non-empty string", raw)
    weight = obj.get(weight_field) if weight_field is not None else None
    if weight is not None:
        value = _as_weight(weight)
        if value is None:
            shown = repr(weight) if len(repr(weight)) <= 40 else repr(weight)[:40] + "..."
            return Rejection("bad_weight", f"{weight_field!r} (buffer.weight_field) must be a finite number >= 0, got {shown}", raw)
        weight = value
    return Document(str(doc_id), body, domain, raw.provenance, weight)
