"""Property tests: the ingest stage is total, from raw bytes to tokens.

Whatever a record holds, ``decode`` (daemon/records.py) turns it into a
Document that the tokenizer, the hold-out hash and the metric labels accept,
or into a Rejection with a documented reason that the dead-letter sink
(daemon/deadletter.py) writes as one JSON line. Nothing in a record may raise
out of the stage: one bad record must never stop the stream.

The records are generated as JSON *text*, not as Python values, so that they
can hold what ``json.dumps`` would never write: integers of thousands of
digits, lone UTF-16 surrogates, nesting far beyond the recursion limit.
"""

import json
import os
import tempfile
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import everlearn.daemon.record_fields as record_fields
import everlearn.daemon.records as records_module
from everlearn.daemon.deadletter import DeadLetterSink
from everlearn.daemon.holdout import held_out
from everlearn.daemon.records import Document, RawRecord, Rejection, decode
from everlearn.learners.model import ModelConfig, build_tokenizer

pytestmark = [pytest.mark.unit, pytest.mark.reliability]

# Hypothesis keeps caches (Unicode tables, constants it collects from the source) in
# ./.hypothesis; keep them in the system's temporary directory instead, so that running
# the tests leaves nothing in the repository (HYPOTHESIS_STORAGE_DIRECTORY still wins).
# Only caches live there: the examples stay the same with or without them.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"everlearn-hypothesis-{os.getuid()}")

# The contract of daemon/records.py, written out here so that a new reason is a deliberate change.
REASONS = frozenset({
    "too_large", "bad_utf8", "too_deep", "bad_json", "not_an_object", "missing_text",
    "bad_field", "bad_unicode", "bad_weight", "empty", "internal_error",
})
MAX_DOMAIN_CHARS = 128
MAX_ID_CHARS = 1024
WEIGHT_FIELD = "quality"
BIG = 10_000_000  # a max_doc_bytes that lets every generated record through the size check

# Reproducible in CI: the same examples every run, nothing stored in a .hypothesis directory.
# No deadline: the deep-nesting records take milliseconds each, and a loaded CI machine
# must not turn that into a flaky failure.
CHECK = settings(max_examples=100, derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TOKENIZER = build_tokenizer(ModelConfig())

# -- strategies --------------------------------------------------------------------------

ANY_CHAR = st.characters(exclude_categories=())  # every category, surrogates (Cs) included
TEXT_CHAR = st.characters(exclude_categories=("Cs",))
DOMAIN_CHAR = st.characters(exclude_categories=("Cs", "Cc"))


def _json_string(s: str, ascii_only: bool) -> str:
    """``s`` as a JSON string literal; a lone surrogate becomes a ``\\udXXX`` escape either way."""
    return json.dumps(s, ensure_ascii=ascii_only)  # ensure_ascii=False keeps it raw: invalid UTF-8 once encoded


json_strings = st.builds(_json_string, st.text(ANY_CHAR, max_size=30), st.booleans())
huge_ints = st.builds(lambda sign, n: sign + "1" + "0" * n, st.sampled_from(["", "-"]),
                      st.sampled_from([20, 309, 1023, 1024, 4299, 4300, 5000]))
numbers = st.one_of(
    st.integers().map(str),
    huge_ints,
    st.floats().map(json.dumps),  # NaN, Infinity, -Infinity, -0.0, 5e-324 ...
    st.sampled_from(["1e999", "-1e999", "1e-999", "0.0", "-0", "1E400"]),
)
scalars = st.one_of(st.sampled_from(["null", "true", "false"]), numbers, json_strings)


def _array(items: list[str]) -> str:
    """A JSON array of already-serialised items."""
    return "[" + ",".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    """A JSON object of already-serialised values (keys may repeat: the last one wins)."""
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(_array),
        st.lists(st.tuples(json_strings, children), max_size=4).map(_object),
    ),
    max_leaves=12,
)

texts = st.builds(_json_string, st.one_of(
    st.text(ANY_CHAR, min_size=1, max_size=40),
    st.text(st.one_of(TEXT_CHAR, st.just("\x00")), min_size=1, max_size=40),  # embedded NULs
    st.sampled_from([" \t\n", "\u3000", "\x00"]),  # blank (missing_text), ideographic space (blank too), NUL (not blank)
), st.booleans())
ids = st.one_of(
    st.builds(_json_string, st.one_of(st.text(ANY_CHAR, max_size=20), st.just("x" * (MAX_ID_CHARS + 1))), st.booleans()),
    st.integers().map(str),
    huge_ints,
)
domains = st.one_of(
    st.text(ANY_CHAR, max_size=20),
    st.text(DOMAIN_CHAR, min_size=MAX_DOMAIN_CHARS - 1, max_size=MAX_DOMAIN_CHARS + 2),
    st.sampled_from(["news", "", " ", "a\nb", "tab\there", "\x00", "\x7f", "\u0085", "x" * 100_000]),
)
weights = st.one_of(numbers, st.sampled_from(['"2"', "true", "[1]"]))


def _field(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A field's value as JSON text: of the right kind three times in four, else of any type at all."""
    return st.sampled_from([values, values, values, json_values]).flatmap(lambda chosen: chosen)


@st.composite
def json_objects(draw) -> str:
    """A record object whose ``text``, ``id``, ``domain`` and weight are each missing, right, or of any type."""
    pairs = []
    fields = (("text", texts), ("id", ids), ("domain", st.builds(_json_string, domains, st.booleans())),
              (WEIGHT_FIELD, weights))
    for key, values in fields:
        if draw(st.booleans()) or key == "text":
            pairs.append((json.dumps(key), draw(_field(values))))
    pairs += draw(st.lists(st.tuples(json_strings, json_values), max_size=2))
    return _object(draw(st.permutations(pairs)))


def _nested(kind: str, n: int) -> str:
    """A record nested ``n`` levels deep, built as a string (no Python value could be this deep)."""
    return {
        "arrays": "[" * n + "]" * n,
        "objects": '{"a":' * n + "1" + "}" * n,
        "unbalanced": "[" * n,
        "text_inside": '{"a":' * n + '{"text": "t"}' + "}" * n,
        "beside_text": '{"text": "t", "x": ' + "[" * n + "]" * n + "}",
        "in_weight": '{"text": "t", "quality": ' + "[" * n + "1" + "]" * n + "}",
        "in_id": '{"text": "t", "id": ' + '{"a":' * n + "0" + "}" * n + "}",
        "in_a_string": '{"text": "' + "[{" * n + '"}',  # brackets in a string are text, not nesting
        "after_an_escape": '{"text": "\\"' + "[" * n + '\\\\"}',
    }[kind]


nested = st.builds(_nested,
                   st.sampled_from(["arrays", "objects", "unbalanced", "text_inside", "beside_text",
                                    "in_weight", "in_id", "in_a_string", "after_an_escape"]),
                   st.one_of(st.integers(1, 80), st.integers(1, 100_000)))


def _to_bytes(text: str) -> bytes:
    """The record's bytes; a lone surrogate written raw becomes invalid UTF-8, as a broken producer would write it."""
    return text.encode("utf-8", "surrogatepass")


record_data = st.one_of(
    st.binary(max_size=200),
    st.text(st.one_of(TEXT_CHAR, st.just("\x00")), max_size=60).map(_to_bytes),  # valid UTF-8, NULs included
    json_values.map(_to_bytes),
    json_objects().map(_to_bytes),
    nested.map(_to_bytes),
)

provenance_values = st.one_of(
    st.integers(), st.floats(), st.text(ANY_CHAR, max_size=10), st.binary(max_size=10), st.none(),
    st.sets(st.integers(), max_size=3), st.complex_numbers(), st.builds(object),
    st.lists(st.integers(), max_size=3).map(tuple),
)
provenances = st.one_of(
    st.fixed_dictionaries({"file": st.text(ANY_CHAR, max_size=10), "offset": st.integers(0, 2**40)}),
    st.dictionaries(st.text(ANY_CHAR, max_size=8), provenance_values, max_size=3),
    st.dictionaries(st.one_of(st.integers(), st.text(max_size=3), st.tuples(st.integers())), provenance_values, max_size=3),
)
records = st.builds(
    RawRecord,
    data=record_data,
    kind=st.sampled_from(["jsonl", "txt"]),
    provenance=provenances,
    default_id=st.one_of(st.just("d/a.jsonl@0"), st.text(ANY_CHAR, max_size=20)),
    default_domain=st.one_of(st.just("d"), domains),
)
max_doc_bytes = st.one_of(st.integers(1, 64), st.just(BIG))

# -- the property ------------------------------------------------------------------------


def assert_usable(doc: Document, record: RawRecord) -> None:
    """A document must survive every later step: tokenizer, hold-out hash, metric label, replay weight."""
    assert isinstance(doc.text, str) and doc.text.strip()
    assert len(TOKENIZER.encode(doc.text)) == len(doc.text.encode("utf-8"))
    assert isinstance(doc.id, str) and len(doc.id) <= MAX_ID_CHARS
    held_out(doc.id, 0.05)
    assert isinstance(doc.domain, str) and 0 < len(doc.domain) <= MAX_DOMAIN_CHARS
    doc.domain.encode("utf-8")
    assert not any(unicodedata.category(c) == "Cc" for c in doc.domain), f"control character in domain {doc.domain!r}"
    assert doc.weight is None or (type(doc.weight) is float and 0 <= doc.weight < float("inf"))
    assert doc.provenance is record.provenance


def assert_dead_letter(rej: Rejection, record: RawRecord) -> None:
    """A rejection must name a documented reason and reach the dead-letter file as one JSON line."""
    assert rej.reason in REASONS, f"undocumented reason {rej.reason!r}"
    assert isinstance(rej.detail, str) and rej.detail
    assert rej.record is record
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dead_letter.jsonl"
        DeadLetterSink(path).write([rej])
        lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["reason"] == rej.reason and row["detail"] == rej.detail


def assert_total(record: RawRecord, limit: int, weight_field: str | None) -> None:
    """The property itself: decode returns (never raises), and what it returns is usable downstream."""
    out = decode(record, limit, weight_field)
    if isinstance(out, Document):
        assert_usable(out, record)
    else:
        assert isinstance(out, Rejection), f"decode returned {type(out).__name__}"
        assert_dead_letter(out, record)


def _jsonl(data: bytes | str) -> RawRecord:
    """A jsonl record with ordinary provenance, for the pinned examples."""
    data = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return RawRecord(data, "jsonl", {"file": "d/a.jsonl", "offset": 0}, "d/a.jsonl@0", "d")


# -- tests -------------------------------------------------------------------------------


@CHECK
@given(record=records, limit=max_doc_bytes, weight_field=st.sampled_from([None, WEIGHT_FIELD]))
@example(record=_jsonl("[" * 100_000 + "]" * 100_000), limit=BIG, weight_field=None)
@example(record=_jsonl('{"text": "t", "x": ' + "[" * 5000 + "]" * 5000 + "}"), limit=BIG, weight_field=None)
@example(record=_jsonl('{"text": "\\ud800"}'), limit=BIG, weight_field=None)
@example(record=_jsonl('{"text": "t", "id": "\\udfff"}'), limit=BIG, weight_field=None)
@example(record=_jsonl('{"text": "t", "domain": "\\ud83d"}'), limit=BIG, weight_field=None)
@example(record=_jsonl('{"text": "t", "id": 1' + "0" * 4299 + "}"), limit=BIG, weight_field=None)
@example(record=_jsonl('{"text": "t", "domain": "' + "x" * 100_000 + '"}'), limit=BIG, weight_field=None)
@example(record=_jsonl('{"text": "t", "domain": "a\\nb"}'), limit=BIG, weight_field=None)
@example(record=_jsonl('{"text": "t", "quality": ' + "[" * 900 + "]" * 900 + "}"), limit=BIG, weight_field=WEIGHT_FIELD)
def test_any_record_becomes_a_usable_document_or_a_dead_letter(record, limit, weight_field):
    assert_total(record, limit, weight_field)


@CHECK
@given(data=nested, kind=st.sampled_from(["jsonl", "txt"]), weight_field=st.sampled_from([None, WEIGHT_FIELD]))
def test_deep_nesting_never_raises(data, kind, weight_field):
    record = RawRecord(_to_bytes(data), kind, {"file": "d/deep.jsonl"}, "d/deep.jsonl@0", "d")
    assert_total(record, BIG, weight_field)


@CHECK
@given(data=json_objects().map(_to_bytes), weight_field=st.sampled_from([None, WEIGHT_FIELD]))
def test_objects_with_wrong_types_in_every_field(data, weight_field):
    assert_total(_jsonl(data), BIG, weight_field)


@CHECK
@given(data=st.one_of(st.binary(max_size=300), st.text(TEXT_CHAR).map(_to_bytes)),
       kind=st.sampled_from(["jsonl", "txt"]), limit=max_doc_bytes)
def test_raw_bytes_never_raise(data, kind, limit):
    assert_total(RawRecord(data, kind, {"file": "f"}, "f@0", "d"), limit, None)


@CHECK
@given(
    doc_id=st.one_of(st.text(TEXT_CHAR, max_size=MAX_ID_CHARS), st.integers()),
    text=st.text(TEXT_CHAR, min_size=1).filter(str.strip),
    domain=st.text(DOMAIN_CHAR, min_size=1, max_size=MAX_DOMAIN_CHARS),
    ascii_only=st.booleans(),
)
def test_well_formed_records_round_trip(doc_id, text, domain, ascii_only):
    data = json.dumps({"id": doc_id, "text": text, "domain": domain}, ensure_ascii=ascii_only).encode()
    record = _jsonl(data)
    assert decode(record, BIG) == Document(str(doc_id), text, domain, record.provenance)


@CHECK
@given(text=st.text(st.one_of(TEXT_CHAR, st.just("\x00")), min_size=1).filter(str.strip))
def test_txt_records_keep_their_text(text):
    record = RawRecord(text.encode(), "txt", {"file": "law/x.txt"}, "law/x.txt", "law")
    assert decode(record, BIG) == Document("law/x.txt", text, "law", record.provenance)


@CHECK
@given(provenance=provenances, detail=st.text(ANY_CHAR, min_size=1, max_size=20), data=st.binary(max_size=40))
def test_the_sink_writes_any_rejection(provenance, detail, data):
    record = RawRecord(data, "jsonl", provenance, "x", "d")
    assert_dead_letter(Rejection("bad_json", detail, record), record)


def test_every_reason_is_documented():
    for reason in REASONS:
        assert reason in Rejection.__doc__, f"reason {reason!r} is not documented in Rejection's docstring"


def test_the_contract_matches_the_code():
    assert records_module.REASONS == REASONS
    assert (record_fields.MAX_ID_CHARS, record_fields.MAX_DOMAIN_CHARS) == (MAX_ID_CHARS, MAX_DOMAIN_CHARS)


@pytest.mark.parametrize(
    "data, reason, says",
    [
        ("[" * 65 + "]" * 65, "too_deep", "65 levels"),
        ("[" * 100_000 + "]" * 100_000, "too_deep", "more than the 64"),
        ('{"text": "t", "x": ' + "[" * 100 + "]" * 100 + "}", "too_deep", "flatten"),
        ("[" * 100, "too_deep", "100 levels"),  # unbalanced, deep before it is broken
        ('{"text": "\\ud800"}', "bad_unicode", "field 'text'"),
        ('{"text": "ok \\udc00 ok"}', "bad_unicode", "at character 3"),
        ('{"text": "t", "id": "\\udfff"}', "bad_unicode", "field 'id'"),
        ('{"text": "t", "domain": "\\ud83d"}', "bad_unicode", "field 'domain'"),
        ('{"text": "t", "id": true}', "bad_field", "got a boolean"),
        ('{"text": "t", "id": {"k": 1}}', "bad_field", "got an object"),
        ('{"text": "t", "id": "' + "x" * 1025 + '"}', "bad_field", "1025 characters"),
        ('{"text": "t", "id": 1' + "0" * 1024 + "}", "bad_field", "1025 characters"),
        ('{"text": "t", "domain": "' + "x" * 129 + '"}', "bad_field", "129 characters"),
        ('{"text": "t", "domain": "a\\nb"}', "bad_field", "control character '\\n'"),
        ('{"text": "t", "domain": "\\u0000"}', "bad_field", "control character"),
        ('{"text": "t", "domain": ""}', "bad_field", "got an empty string"),
    ],
)
def test_new_rejections_say_what_is_wrong(data, reason, says):
    rej = decode(_jsonl(data), BIG)
    assert isinstance(rej, Rejection), rej
    assert (rej.reason, says in rej.detail) == (reason, True), rej.detail


def test_deep_nesting_up_to_the_bound_is_a_document():
    data = '{"text": "t", "x": ' + "[" * 63 + "]" * 63 + "}"  # 64 levels with the object itself
    assert isinstance(decode(_jsonl(data), BIG), Document)


def test_brackets_inside_strings_are_not_nesting():
    text = "[{" * 10_000 + '\\" ]]' + "{" * 100
    doc = decode(_jsonl(json.dumps({"text": text})), BIG)
    assert isinstance(doc, Document) and doc.text == text


@pytest.mark.parametrize(
    "default_id, default_domain, reason",
    [("\udcff.txt", "d", "bad_unicode"), ("x.txt", "\udcff", "bad_unicode"), ("x.txt", "a\tb", "bad_field"),
     ("x.txt", "", "bad_field"), ("x" * 1025, "d", "bad_field")],
)
def test_txt_records_check_the_source_defaults(default_id, default_domain, reason):
    # a file name that is not UTF-8 arrives with surrogateescape'd bytes; a subdirectory name becomes the domain
    rej = decode(RawRecord(b"some text", "txt", {"file": "f"}, default_id, default_domain), BIG)
    assert isinstance(rej, Rejection) and rej.reason == reason
    assert "the source's default" in rej.detail


def test_a_bug_in_decoding_is_an_internal_error_not_a_crash():
    rej = decode(RawRecord(memoryview(b"text"), "txt", {}, "x", "d"), BIG)  # memoryview has no .decode
    assert isinstance(rej, Rejection) and rej.reason == "internal_error"
    assert rej.detail.startswith("AttributeError: ")


beside = st.one_of(st.none(), st.binary(max_size=60), st.text(ANY_CHAR, max_size=60),
                   st.text(ANY_CHAR, min_size=1, max_size=3).map(lambda s: s * 700))  # a key or header a Kafka source read


@CHECK
@given(fixed_id=beside, fixed_domain=beside, kind=st.sampled_from(["jsonl", "txt"]))
def test_ids_and_domains_read_beside_the_record_are_checked_like_its_fields(fixed_id, fixed_domain, kind):
    data = b'{"text": "some text", "id": "field-id", "domain": "field-domain"}' if kind == "jsonl" else b"some text"
    record = RawRecord(data, kind, {"topic": "t", "partition": 0, "offset": 7}, "t:0:7", "t", fixed_id, fixed_domain)
    assert_total(record, 10_000, None)
    out = decode(record, 10_000)
    if isinstance(out, Document):  # what the source read beside the record wins; without it, the field, then the default
        want_id = fixed_id if fixed_id is not None else ("field-id" if kind == "jsonl" else "t:0:7")
        want_domain = fixed_domain if fixed_domain is not None else ("field-domain" if kind == "jsonl" else "t")
        assert out.id == (want_id.decode() if isinstance(want_id, bytes) else want_id)
        assert out.domain == (want_domain.decode() if isinstance(want_domain, bytes) else want_domain)
    else:
        assert out.reason in ("bad_field", "bad_unicode"), out
