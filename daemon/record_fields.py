"""The checks of a record's fields (id, domain, weight, any text): what the rest of the run relies on.

An id is hashed for hold-out and kept in lineage, a domain is a metric label
and a replay key, a weight is a sampling probability: each is bounded and
encodable, or the record is rejected with a reason and a message that says
what to fix. ``Invalid`` is how every check of ``records.decode`` fails.
"""

import math
import unicodedata
from typing import Any

MAX_ID_CHARS = 1024  # an id is hashed for hold-out and kept in lineage: a key, not a payload
MAX_DOMAIN_CHARS = 128  # a domain is a Prometheus label and a replay key: a short name


class Invalid(Exception):
    """A check failed; ``decode`` turns it into a Rejection with this reason and detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
               str: "a string", list: "an array", dict: "an object"}


def _json_type(value: Any) -> str:
    """``value``'s JSON type in words, so a message names what the producer wrote, not a Python class."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _as_weight(value: Any) -> float | None:
    """``value`` as a replay weight (a finite float >= 0), or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        weight = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return weight if 0 <= weight < math.inf else None  # NaN fails both comparisons


def check_unicode(value: str, where: str) -> None:
    """Refuse lone surrogates: JSON lets a ``\\ud800`` escape through, but the tokenizer and the hold-out hash cannot encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Invalid("bad_unicode", (
            f"{where} has a lone UTF-16 surrogate {value[e.start]!r} at character {e.start}; "
            "a \\ud800-\\udfff escape must be half of a pair (high then low): fix the producer's JSON encoding"
        )) from None


def _int_id(value: int, where: str) -> str:
    """An integer id as text; Python refuses to print integers of more than 4300 digits, so that is caught here."""
    try:
        return str(value)
    except ValueError:
        raise Invalid("bad_field", (
            f"{where} is an integer too large to print; an id may have at most {MAX_ID_CHARS} characters: use a string key"
        )) from None


def valid_id(value: Any, where: str) -> str:
    """The id as a string: it is hashed (UTF-8) for hold-out and kept in lineage, so it must be bounded, encodable text."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Invalid("bad_field", f"{where} must be a string or an integer, got {_json_type(value)}")
    doc_id = _int_id(value, where) if isinstance(value, int) else value
    if len(doc_id) > MAX_ID_CHARS:
        raise Invalid("bad_field", (
            f"{where} has {len(doc_id)} characters, more than the {MAX_ID_CHARS} an id may have; "
            "use a shorter key (e.g. a hash of the long one)"
        ))
    check_unicode(doc_id, where)
    return doc_id


def valid_domain(value: Any, where: str) -> str:
    """The domain: a metric label and a replay key, so a short, non-empty string of printable characters."""
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else _json_type(value)
        raise Invalid("bad_field", f"{where} must be a non-empty string, got {got}")
    if len(value) > MAX_DOMAIN_CHARS:
        raise Invalid("bad_field", (
            f"{where} has {len(value)} characters, more than the {MAX_DOMAIN_CHARS} a domain may have; "
            "a domain is a metric label: use a short name such as 'news'"
        ))
    check_unicode(value, where)
    control = next((i for i, c in enumerate(value) if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise Invalid("bad_field", (
            f"{where} has the control character {value[control]!r} at character {control}; "
            "a domain is a metric label: use printable characters only"
        ))
    return value


def weight(obj: dict[str, Any], weight_field: str | None) -> float | None:
    """The record's replay weight from ``buffer.weight_field``: None when unset or absent, else a finite float >= 0."""
    weight = obj.get(weight_field) if weight_field is not None else None
    if weight is None:
        return None
    value = _as_weight(weight)
    if value is None:
        shown = repr(weight) if len(repr(weight)) <= 40 else repr(weight)[:40] + "..."
        raise Invalid("bad_weight", f"{weight_field!r} (buffer.weight_field) must be a finite number >= 0, got {shown}")
    return value


def source_text(value: str | bytes, where: str) -> str:
    """An id or domain a source read as bytes (a Kafka key or header) as text: strict UTF-8."""
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid("bad_field", f"{where} is not UTF-8 (at byte {e.start}); produce keys and headers as UTF-8 text") from None
