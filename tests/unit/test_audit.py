"""The audit log (deploy/audit.py) after a crash mid-append, and its tail on a big log.

The round trip and append-only behaviour are tested in test_gates.py.
"""

import json

import pytest

from everlearn.deploy import AuditLog

pytestmark = pytest.mark.unit

TORN = b'{"n": 3, "verdict": "prom'  # a crash in the middle of an append


def log_with(tmp_path, n: int) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", clock=lambda: 1.0)
    for i in range(n):
        log.append({"n": i})
    return log


def test_a_torn_last_line_is_skipped_by_read_and_tail(tmp_path):
    log = log_with(tmp_path, 2)
    with open(log.path, "ab") as f:
        f.write(TORN)
    assert [r["n"] for r in log.read()] == [0, 1]
    assert [r["n"] for r in log.tail()] == [0, 1]
    assert [r["n"] for r in log.tail(max_bytes=len(TORN) + 30)] == [1]


def test_the_append_after_a_torn_line_starts_on_a_fresh_line(tmp_path):
    log = log_with(tmp_path, 2)
    with open(log.path, "ab") as f:
        f.write(TORN)
    log.append({"n": 4})
    log.append({"n": 5})
    assert [r["n"] for r in log.read()] == [0, 1, 4, 5]
    assert [r["n"] for r in log.tail()] == [0, 1, 4, 5]
    lines = log.path.read_bytes().split(b"\n")
    assert lines[2] == TORN and json.loads(lines[3])["n"] == 4
    assert log.path.read_bytes().endswith(b"\n")


def test_a_complete_record_missing_only_its_newline_is_kept(tmp_path):
    log = log_with(tmp_path, 1)
    with open(log.path, "ab") as f:
        f.write(b'{"n": 1}')
    log.append({"n": 2})
    assert [r["n"] for r in log.read()] == [0, 1, 2]


def test_a_torn_line_in_the_middle_hides_nothing_after_it(tmp_path):
    log = log_with(tmp_path, 1)
    with open(log.path, "ab") as f:
        f.write(TORN + b"\n" + b"[1, 2]\n" + b"\n")  # torn, not an object, blank
    log.append({"n": 9})
    assert [r["n"] for r in log.read()] == [0, 9]


def test_tail_returns_only_complete_records_from_the_end_of_a_big_log(tmp_path):
    log = log_with(tmp_path, 3000)
    everything = log.read()
    assert log.path.stat().st_size > 50_000
    for max_bytes in (1, 30, 100, 1000, 4097, 50_000):
        tail = log.tail(max_bytes=max_bytes)
        assert tail == everything[len(everything) - len(tail):], max_bytes  # the newest, in order, none made up
        size = sum(len(json.dumps(r, sort_keys=True)) + 1 for r in tail)
        assert size <= max_bytes
        more = everything[len(everything) - len(tail) - 1:]
        assert sum(len(json.dumps(r, sort_keys=True)) + 1 for r in more) > max_bytes  # and every record that fits
    assert log.tail(max_bytes=10**9) == everything


def test_tail_keeps_a_record_that_starts_exactly_at_the_cut(tmp_path):
    log = log_with(tmp_path, 10)  # records 0..9 serialise to lines of one length
    line = len(log.path.read_bytes().split(b"\n")[0]) + 1
    assert [r["n"] for r in log.tail(max_bytes=3 * line)] == [7, 8, 9]
    assert [r["n"] for r in log.tail(max_bytes=3 * line - 1)] == [8, 9]


def test_a_missing_log_reads_empty(tmp_path):
    log = AuditLog(tmp_path / "nothing" / "audit.jsonl")
    assert log.read() == [] and log.tail() == []
