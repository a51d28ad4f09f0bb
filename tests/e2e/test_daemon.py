"""The daemon end to end, as a user runs it: `everlearn run` on a directory stream.

Two domains are fed in sequence (manual pages, then Python sources). The tests
check what a user relies on: the model learns and is promoted, serving swaps in
place, a gate that cannot pass never changes serving, and a clean stop and
restart continue exactly where the run was (step, buffer, stream).
"""

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from everlearn.buffers import UniformReservoir
from everlearn.buffers.persist import buffer_digest, from_files
from everlearn.daemon import demo
from everlearn.daemon.holdout import content_key, held_out
from everlearn.daemon.runstate import DAEMON_STATE, INGEST_META
from everlearn.learners import CheckpointStore, build_tokenizer
from everlearn.learners.model import ModelConfig
from tests.e2e.helpers import EVERLEARN, DaemonProcess, get_json, post_json, tiny_config, wait_for

pytestmark = pytest.mark.e2e

DOMAIN_BYTES = 40_000
BAD_LINES = [b"{not json\n", b"\xff\xfe\xfa binary\n", b'{"id": "no-text"}\n', b"[1, 2, 3]\n"]


def _write_stream(stream: Path, name: str, domain: str, docs: list[tuple[str, str]], bad: list[bytes] = ()) -> None:
    tmp = stream / f".{name}.tmp"
    with open(tmp, "wb") as f:
        for i, (doc_id, text) in enumerate(docs):
            f.write((json.dumps({"id": doc_id, "text": text, "domain": domain}) + "\n").encode())
            if i < len(bad):
                f.write(bad[i])
    tmp.rename(stream / name)


def _checkpoint_state(store: CheckpointStore, ref, seq_len: int, capacity: int):
    state = {**json.loads(store.read(ref, DAEMON_STATE)), **json.loads(store.read(ref, INGEST_META))}
    buf = UniformReservoir(capacity, seq_len)
    buf.load_state_dict(from_files("buffer", lambda name: store.read(ref, name)))
    return state, buf


def _lineage(path: Path) -> list[dict]:
    """Lineage records of the steps the model kept: a resume marker drops the steps after it."""
    records: list[dict] = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "resumed_from_step" in rec:
            records = [r for r in records if r["step"] <= rec["resumed_from_step"]]
        else:
            records.append(rec)
    return records


def _trained_spans(path: Path) -> tuple[list[int], dict[str, list[tuple[int, int]]]]:
    steps, spans = [], {}
    for rec in _lineage(path):
        steps.append(rec["step"])
        for doc_id, start, end in rec["spans"]:
            spans.setdefault(doc_id, []).append((start, end))
    return steps, spans


def test_learns_promotes_swaps_and_resumes_exactly(tmp_path, port_factory):
    serve_port, metrics_port = port_factory(), port_factory()
    config = tiny_config(tmp_path, serve_port, metrics_port)
    stream, run = tmp_path / "stream", tmp_path / "run"
    base = f"http://127.0.0.1:{serve_port}"
    status_url = f"http://127.0.0.1:{metrics_port}/status"

    man = demo.take(demo.man_pages(), DOMAIN_BYTES)
    py_all = demo.take(demo.python_sources(), 3 * DOMAIN_BYTES)
    n_py = len(demo.take(iter(py_all), DOMAIN_BYTES))
    py, py_more = py_all[:n_py], py_all[n_py : n_py + 8]
    # held-out second-domain text no run ever streams
    probe = "".join(text for _, text in demo.take(demo.python_sources(), 4000, skip_bytes=6 * DOMAIN_BYTES))

    daemon = DaemonProcess(config, log=tmp_path / "run1.log")
    try:
        wait_for(lambda: get_json(f"{base}/version")["version"] == 0, 120, "serving version 0", daemon)
        replica_pid = get_json(f"{base}/version")["replica_pid"]
        assert get_json(f"{base}/healthz")["ok"] is True
        before = post_json(f"{base}/score", {"text": probe})
        assert before["version"] == 0 and before["tokens"] > 1000

        _write_stream(stream, "00-manpages.jsonl", "manpages", man, BAD_LINES)
        _write_stream(stream, "01-python.jsonl", "python", py)
        total = len(man) + len(py)
        wait_for(lambda: get_json(status_url)["documents"] == total, 180, "all documents ingested", daemon)
        version_at_ingest = get_json(status_url)["served_version"]
        wait_for(lambda: get_json(f"{base}/version")["version"] > max(version_at_ingest, 0), 180,
                 "a promotion after the second domain arrived", daemon)

        after = post_json(f"{base}/score", {"text": probe})
        assert after["version"] > 0
        assert get_json(f"{base}/version")["replica_pid"] == replica_pid  # swapped in place, not restarted
        assert after["loss"] < before["loss"] - 0.1, (before, after)
        gen = post_json(f"{base}/generate", {"prompt": "def ", "max_new_tokens": 16})
        assert isinstance(gen["text"], str) and gen["version"] == after["version"]

        status = get_json(status_url)
        assert status["dead_lettered"] == len(BAD_LINES)
        cli = subprocess.run([*EVERLEARN, "status", "-c", str(config)], capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and "serving v" in cli.stdout and "documents: " in cli.stdout, cli.stdout + cli.stderr
        cli = subprocess.run([*EVERLEARN, "status", "-c", str(config), "--json"], capture_output=True, text=True, timeout=60)
        later = json.loads(cli.stdout)  # training goes on meanwhile: the numbers only grow
        assert later["step"] >= status["step"] and later["served_version"] >= status["served_version"]
        assert later["dead_lettered"] == len(BAD_LINES)
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        daemon.kill()

    events = daemon.events()
    assert any(e["event"] == "gate" and e["verdict"] == "promoted" for e in events)
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped, daemon.tail()
    stop_step = stopped[-1]["step"]

    # what was rejected is in the dead-letter sink with its reason, and nothing else is
    dead = [json.loads(line) for line in (run / "dead_letter.jsonl").read_text().splitlines()]
    assert sorted(d["reason"] for d in dead) == sorted(["bad_json", "bad_utf8", "missing_text", "not_an_object"])
    assert all(d["provenance"]["file"] == "00-manpages.jsonl" for d in dead)

    # every decision is audited; served version = last promotion
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    promoted = [a for a in audit if a["verdict"] == "promoted"]
    assert promoted and all(a["metrics"]["improvement"]["lower"] >= a["config"]["min_improvement"] for a in promoted)
    assert all(g["passed"] for a in promoted for g in a["metrics"]["gates"])
    assert promoted[-1]["promoted_version"] >= after["version"]

    # the stop checkpointed at the step it stopped on
    store = CheckpointStore(str(run / "checkpoints"))
    ref = store.latest()
    assert ref.step == stop_step
    state1, buf1 = _checkpoint_state(store, ref, 64, 256)
    assert len(buf1) > 0
    digest1 = buffer_digest(buf1)

    # restart: more data arrives, 12 more steps
    _write_stream(stream, "02-python.jsonl", "python", py_more)
    # (serving off: the restarted run's state is what is checked; SERVED.json still says what serves)
    daemon2 = DaemonProcess(config, "--max-steps", "12", "--set", "serve.enabled=false", log=tmp_path / "run2.log")
    try:
        assert daemon2.wait(240) == 0, daemon2.tail()
    finally:
        daemon2.kill()
    events2 = daemon2.events()
    resumed = [e for e in events2 if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] == stop_step, daemon2.tail()
    assert resumed[0]["buffer_sha256"] == digest1
    ready = [e for e in events2 if e["event"] == "ready"]
    assert ready[0]["served_version"] == promoted[-1]["promoted_version"]
    assert [e for e in events2 if e["event"] == "stopped"][-1]["step"] == stop_step + 12

    # no document skipped, none trained twice: each document's trained token ranges
    # are contiguous from 0 without overlap, and what is left is still pending
    steps, spans = _trained_spans(run / "lineage.jsonl")
    assert steps == list(range(1, stop_step + 13))
    ref2 = store.latest()
    state2, _ = _checkpoint_state(store, ref2, 64, 256)
    pending = {s["id"]: s["start"] for s in state2["packer"]["segments"]}
    tok = build_tokenizer(ModelConfig())
    docs = {doc_id: text for doc_id, text in man + py + py_more}
    position = state2["source"]["position"]
    for name in ("00-manpages.jsonl", "01-python.jsonl"):  # read to the end: still open at its size, or closed behind the watermark
        open_file = position["files"].get(name)
        assert (open_file["offset"] == (stream / name).stat().st_size) if open_file else position["dirs"][""]["after"] >= name
    polled = {doc_id for doc_id, _ in man + py}
    polled |= {doc_id for doc_id in docs if doc_id in spans or doc_id in pending}
    for doc_id in polled:
        n_tokens = len(tok.encode(docs[doc_id])) + 1  # + EOS
        if held_out(content_key(docs[doc_id]), 0.15):
            assert doc_id not in spans, f"held-out document {doc_id} was trained on"
            continue
        covered = sorted(spans.get(doc_id, []))
        pos = 0
        for start, end in covered:
            assert start == pos, f"{doc_id}: gap or overlap at token {pos} ({covered})"
            pos = end
        expected_end = pending.get(doc_id, n_tokens)
        assert pos == expected_end, f"{doc_id}: trained up to {pos}, pending from {pending.get(doc_id)}, {n_tokens} tokens"
    # the restarted run's first trained tokens are exactly the first tokens pending at the stop
    first_after = _lineage(run / "lineage.jsonl")[stop_step]["spans"][0]
    first_pending = state1["packer"]["segments"][0]
    assert first_after[:2] == [first_pending["id"], first_pending["start"]]


def test_gate_that_cannot_pass_never_changes_serving(tmp_path, port_factory):
    serve_port, metrics_port = port_factory(), port_factory()
    config = tiny_config(tmp_path, serve_port, metrics_port, gate={"every_steps": 10, "min_improvement": 1.0})
    _write_stream(tmp_path / "stream", "00-manpages.jsonl", "manpages", demo.take(demo.man_pages(), 30_000))
    daemon = DaemonProcess(config, "--max-steps", "40", log=tmp_path / "run.log")
    versions, rejected_metric_seen = set(), False
    try:
        while daemon.proc.poll() is None:
            try:
                versions.add(get_json(f"http://127.0.0.1:{serve_port}/version", timeout=2)["version"])
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
                    rejected_metric_seen |= 'everlearn_gate_decisions_total{verdict="rejected"}' in r.read().decode()
            except OSError:
                pass
            time.sleep(0.2)
        assert daemon.wait(10) == 0, daemon.tail()
    finally:
        daemon.kill()
    assert versions == {0}
    assert rejected_metric_seen
    audit = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    assert len(audit) == 4 and all(a["verdict"] == "rejected" and a["reason"].startswith("improvement") for a in audit)
    assert all(a["serving_version"] == 0 for a in audit)
    served = json.loads((tmp_path / "run" / "checkpoints" / "SERVED.json").read_text())
    assert served["version"] == 0 and served["step"] == 0

