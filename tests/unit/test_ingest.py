"""The ingest stage (daemon/ingest.py) on a local stream directory, the real byte tokenizer and its own metrics registry."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from prometheus_client import CollectorRegistry

from everlearn.daemon.config import Config
from everlearn.daemon.deadletter import DeadLetterSink
from everlearn.daemon.holdout import content_key, held_out
from everlearn.daemon.ingest import IngestStage
from everlearn.daemon.metrics import Metrics
from everlearn.learners import ModelConfig, build_tokenizer

pytestmark = pytest.mark.unit

SEQ, QUEUE, FRACTION = 16, 4, 0.3
IDS = [f"doc-{i}" for i in range(24)]


def text(doc_id: str) -> str:
    n = int(doc_id.split("-")[1])
    return f"text of {doc_id}. " * (1 + n % 3)  # 17 to 54 bytes: windows cut across documents


HELD = [i for i in IDS if held_out(content_key(text(i)), FRACTION)]  # membership by content, not by id
TRAINED = [i for i in IDS if i not in HELD]


def line(doc_id: str) -> bytes:
    return json.dumps({"id": doc_id, "text": text(doc_id)}).encode() + b"\n"


def write_stream(directory: Path, ids=IDS, extra: bytes = b"") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "a.jsonl").write_bytes(b"".join(line(i) for i in ids) + extra)


def config(tmp_path: Path, queue_windows: int = QUEUE, **source) -> Config:
    return Config(
        run_dir=str(tmp_path / "run"),
        source={"url": str(tmp_path / "stream"), "settle_s": 0, "poll_interval_s": 0.02, "max_records_per_poll": 64, **source},
        train={"seq_len": SEQ, "queue_windows": queue_windows, "batch_size": min(8, queue_windows)},
        holdout={"fraction": FRACTION, "fresh_capacity": 8, "old_capacity": 16},
        supervision={"backoff_base_s": 0.01, "backoff_max_s": 0.05, "degraded_after_s": 0.2},
    )


class Stage:
    """An IngestStage with what it reports kept for the test."""

    def __init__(self, tmp_path: Path, tokenizer=None, **cfg):
        self.events: list[tuple[str, dict]] = []
        self.registry = CollectorRegistry()
        self.cfg = config(tmp_path, **cfg)
        self.dead = DeadLetterSink(tmp_path / "run" / f"dead_letter-{id(self)}.jsonl")  # one per stage
        self.stage = IngestStage(self.cfg, tokenizer or build_tokenizer(ModelConfig()), Metrics(self.registry),
                                 lambda name, **fields: self.events.append((name, fields)), self.dead)

    def metric(self, name: str, **labels) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def dead_letters(self) -> list[dict]:
        if not self.dead.path.exists():
            return []
        return [json.loads(x) for x in self.dead.path.read_text().splitlines()]

    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]


@pytest.fixture
def make(tmp_path):
    made: list[Stage] = []

    def build(**kw) -> Stage:
        s = Stage(tmp_path, **kw)
        made.append(s)
        return s

    yield build
    for s in made:
        s.stage.stop(timeout=5)


def poll_all(stage: IngestStage) -> int:
    total = 0
    while (n := stage.poll_once()) > 0:
        total += n
    return total


def take_all(stage: IngestStage) -> list:
    ready = stage.packer.windows_ready()
    return [stage.take(ready, timeout=0)] if ready else []


def doc_order(windows: list) -> list[str]:
    """Document ids in the order their tokens were packed (each once)."""
    out: list[str] = []
    for w in windows:
        for spans in w.lineage:
            for span in spans:
                if not out or out[-1] != span.doc_id:
                    out.append(span.doc_id)
    return out


def tokens_of(windows: list) -> np.ndarray:
    return np.concatenate([w.tokens for w in windows]) if windows else np.zeros((0, SEQ), np.int32)


def test_the_ids_hold_some_documents_out():
    assert 0 < len(HELD) < len(IDS) // 2  # the tests below need both kinds


# -- poll_once -----------------------------------------------------------------

def test_poll_once_packs_documents_holds_out_by_hash_and_dead_letters_bad_records(make, tmp_path):
    bad = b'not json\n{"id": "no-text"}\n[1, 2]\n{"id": "w", "text": "x", "domain": ""}\n'
    write_stream(tmp_path / "stream", extra=bad)
    s = make()
    assert s.stage.poll_once() == len(IDS) + 4
    st = s.stage.status()
    assert (st["documents"], st["held_out"], st["dead_lettered"]) == (len(IDS), len(HELD), 4)
    eos = 1
    assert st["pending_tokens"] == sum(len(text(i).encode()) + 1 for i in TRAINED)  # each document + EOS
    assert [seg.doc_id for seg in s.stage.packer._segments] == TRAINED
    assert len(s.stage.holdout.fresh) + len(s.stage.holdout.old) == sum(
        -(-len(text(i)) // SEQ) for i in HELD)  # held-out tokens cut into windows, never trained
    first = s.stage.packer._segments[0]
    assert first.tokens[-1] == eos and bytes((first.tokens[:-1] - 3).astype(np.uint8)) == text(TRAINED[0]).encode()
    reasons = [d["reason"] for d in s.dead_letters()]
    assert reasons == ["bad_json", "missing_text", "not_an_object", "bad_field"]
    assert s.dead_letters()[0]["provenance"]["file"] == "a.jsonl"
    assert s.metric("everlearn_documents_dead_lettered_total", reason="bad_json") == 1
    assert s.metric("everlearn_documents_held_out_total") == len(HELD)
    assert s.metric("everlearn_documents_ingested_total", domain="default") == len(IDS)
    assert s.metric("everlearn_pending_tokens") == st["pending_tokens"]
    assert s.stage.poll_once() == 0  # nothing new


def test_a_quarantined_document_is_dead_lettered(make, tmp_path):
    write_stream(tmp_path / "stream")
    s = make()
    s.stage.quarantined.add(TRAINED[1])
    poll_all(s.stage)
    assert [(d["reason"], json.loads(d["raw"])["id"]) for d in s.dead_letters()] == [("quarantined", TRAINED[1])]
    assert TRAINED[1] not in [seg.doc_id for seg in s.stage.packer._segments]
    assert s.stage.status()["documents"] == len(IDS) - 1
    assert s.metric("everlearn_documents_dead_lettered_total", reason="quarantined") == 1


class Boom:
    """The byte tokenizer, except that it raises on texts containing 'doc-3.'."""

    def __init__(self):
        self.real = build_tokenizer(ModelConfig())
        self.eos_id, self.pad_id, self.vocab_size = self.real.eos_id, self.real.pad_id, self.real.vocab_size

    def encode(self, text: str) -> np.ndarray:
        if "doc-3." in text:
            raise RuntimeError("tokenizer exploded")
        return self.real.encode(text)


def test_a_tokenizer_that_raises_dead_letters_the_record_and_the_stream_goes_on(make, tmp_path):
    write_stream(tmp_path / "stream")
    s = make(tokenizer=Boom())
    assert poll_all(s.stage) == len(IDS)
    [dead] = s.dead_letters()
    assert dead["reason"] == "internal_error" and "RuntimeError: tokenizer exploded" in dead["detail"]
    assert json.loads(dead["raw"])["id"] == "doc-3"
    packed = [seg.doc_id for seg in s.stage.packer._segments]
    assert packed == [i for i in TRAINED if i != "doc-3"]
    assert s.stage.status()["documents"] == len(IDS) - 1


# -- take ------------------------------------------------------------------------

def test_take_returns_none_until_enough_windows_are_ready(make, tmp_path):
    (tmp_path / "stream").mkdir()
    s = make()
    t0 = time.monotonic()
    assert s.stage.take(1, timeout=0.1) is None
    assert time.monotonic() - t0 >= 0.09  # it waited
    write_stream(tmp_path / "stream", ids=TRAINED[:1])
    s.stage.poll_once()
    ready = s.stage.packer.windows_ready()
    assert s.stage.take(ready + 1, timeout=0) is None  # not enough: nothing taken
    assert s.stage.packer.windows_ready() == ready
    w = s.stage.take(ready, timeout=0)
    assert w.tokens.shape == (ready, SEQ) and w.tokens.dtype == np.int32
    assert [span.doc_id for span in w.lineage[0]] == [TRAINED[0]]


def test_take_wakes_up_when_the_windows_arrive(make, tmp_path):
    write_stream(tmp_path / "stream")
    s = make()
    got = []
    waiter = threading.Thread(target=lambda: got.append(s.stage.take(2, timeout=10)))
    waiter.start()
    time.sleep(0.1)
    assert not got
    t0 = time.monotonic()
    s.stage.poll_once()
    waiter.join(10)
    assert got and got[0] is not None and got[0].tokens.shape == (2, SEQ)
    assert time.monotonic() - t0 < 5


# -- the thread: backpressure, outages -------------------------------------------

def position(stage: IngestStage) -> dict:
    return stage.state_dict()["meta"]["source"]["position"]


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_the_thread_fills_the_queue_then_stops_reading_until_windows_are_taken(make, tmp_path):
    ids = [f"doc-{i}" for i in range(300)]
    write_stream(tmp_path / "stream", ids=ids)
    s = make(max_records_per_poll=2)  # a poll adds at most 2 documents (< 2 x 55 tokens)
    high_water = QUEUE * SEQ
    s.stage.start()
    assert wait_for(lambda: s.stage.packer.pending_tokens >= high_water)
    time.sleep(0.3)  # many poll intervals
    before, pending = position(s.stage), s.stage.packer.pending_tokens
    assert high_water <= pending < high_water + 2 * 56
    time.sleep(0.3)
    assert position(s.stage) == before and s.stage.packer.pending_tokens == pending  # not one record more
    assert s.stage.status()["documents"] < 20
    assert s.metric("everlearn_ingest_queue_windows") == pending // SEQ

    deadline = time.monotonic() + 30
    while s.stage.status()["documents"] < len(ids):  # the learner takes; the stream flows again
        assert time.monotonic() < deadline, "the stream did not flow again"
        s.stage.take(1, timeout=0.05)
        assert s.stage.packer.pending_tokens < high_water + 2 * 56
    assert position(s.stage) != before
    s.stage.stop(timeout=5)
    assert not s.stage.alive


def test_a_failing_source_backs_off_degrades_and_recovers_losing_nothing(make, tmp_path):
    write_stream(tmp_path / "stream")
    reference = make()
    poll_all(reference.stage)
    expected = reference.stage.state_dict()

    s = make(max_records_per_poll=5, queue_windows=1000)  # no backpressure here
    real_poll = s.stage.source.poll
    state = {"calls": 0, "failing": False}

    def flaky(max_records, timeout_s=0.0):
        state["calls"] += 1
        if state["calls"] == 2:  # one batch read, then the outage
            state["failing"] = True
        if state["failing"]:
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_poll(max_records, timeout_s)

    s.stage.source.poll = flaky
    s.stage.start()
    assert wait_for(lambda: s.stage.degraded is not None)
    assert "source failing for" in s.stage.degraded and "ConnectionResetError" in s.stage.degraded
    assert wait_for(lambda: s.metric("everlearn_degraded", component="source") == 1)
    failures = s.metric("everlearn_source_errors_total")
    assert failures >= 2
    errors = [f for name, f in s.events if name == "source_error"]
    assert errors[0]["transient"] is True and errors[0]["failures"] == 1 and "ConnectionResetError" in errors[0]["error"]
    assert 0 <= errors[0]["retry_in_s"] <= 0.05  # rounded to 0.01 s
    assert s.stage.status()["documents"] == 5  # the batch before the outage

    state["failing"] = False
    assert wait_for(lambda: s.stage.status()["documents"] == len(IDS))
    assert s.stage.degraded is None
    assert s.metric("everlearn_degraded", component="source") == 0
    recovered = [f for name, f in s.events if name == "source_recovered"]
    assert len(recovered) == 1 and recovered[0]["after_failures"] >= failures
    s.stage.stop(timeout=5)
    got = s.stage.state_dict()
    assert got["meta"]["packer"] == expected["meta"]["packer"]  # every document once, in order
    assert np.array_equal(got["arrays"]["pending_tokens"], expected["arrays"]["pending_tokens"])
    assert got["meta"]["counters"] == expected["meta"]["counters"]


# -- state -------------------------------------------------------------------------

def round_trip(state: dict) -> dict:
    """What a checkpoint makes of the state: arrays through safetensors, meta through JSON."""
    return {"arrays": safetensors.numpy.load(safetensors.numpy.save(state["arrays"])),
            "meta": json.loads(json.dumps(state["meta"])), "holdout_old": state["holdout_old"]}


def test_the_state_holds_int32_token_arrays_and_json_meta(make, tmp_path):
    write_stream(tmp_path / "stream")
    s = make()
    poll_all(s.stage)
    state = s.stage.state_dict()
    assert set(state["arrays"]) == {"pending_tokens", "pending_lengths", "fresh_tokens", "fresh_lengths", "fresh_documents",
                                    "probe_tokens", "probe_lengths", "drift_open", "drift_reference", "drift_ring", "drift_sizes"}
    for name in ("pending_tokens", "fresh_tokens"):
        assert isinstance(state["arrays"][name], np.ndarray) and state["arrays"][name].dtype == np.int32
    assert len(state["arrays"]["pending_tokens"]) == s.stage.packer.pending_tokens
    assert json.loads(json.dumps(state["meta"])) == state["meta"]
    assert state["meta"]["source"]["url"] == str(tmp_path / "stream")
    assert state["meta"]["counters"] == {"documents": len(IDS), "held_out": len(HELD), "dead_lettered": 0}


def test_the_drift_monitor_sees_every_accepted_document_and_survives_the_checkpoint(make, tmp_path):
    write_stream(tmp_path / "stream")
    s = make()
    poll_all(s.stage)
    tokens = s.stage.drift.tokens
    records = [json.loads(r) for f in (tmp_path / "stream").glob("*") for r in f.read_text().splitlines()]
    accepted = sum(len(s.stage.tokenizer.encode(r["text"])) for r in records)
    assert int(tokens.history.sum() + tokens.open.sum()) == accepted  # every document, trained and held out
    restored = make()
    restored.stage.load_state_dict(round_trip(s.stage.state_dict()))
    assert restored.stage.drift.stats() == s.stage.drift.stats()
    assert np.array_equal(restored.stage.drift.tokens.open, tokens.open)


def test_a_drift_state_that_does_not_fit_is_dropped_with_an_event(make, tmp_path):
    write_stream(tmp_path / "stream")
    s = make()
    poll_all(s.stage)
    state = round_trip(s.stage.state_dict())
    state["meta"]["drift"]["vocab_size"] = 7
    restored = make()
    restored.stage.load_state_dict(state)
    assert restored.stage.drift.stats()["reference_tokens"] == 0
    assert "drift_state_dropped" in [name for name, _ in restored.events]


def test_a_new_stage_loaded_from_the_state_continues_exactly(make, tmp_path):
    write_stream(tmp_path / "stream")
    whole = make()
    poll_all(whole.stage)
    reference = take_all(whole.stage)

    first = make(max_records_per_poll=5)
    first.stage.poll_once()
    before = [first.stage.take(1, timeout=0)]
    state = round_trip(first.stage.state_dict())
    first.stage.poll_once()  # the first stage reads on: none of that is in the state

    second = make()
    second.stage.load_state_dict(state)
    assert second.stage.status()["documents"] == 5
    poll_all(second.stage)
    after = take_all(second.stage)
    assert np.array_equal(tokens_of(before + after), tokens_of(reference))
    assert doc_order(before + after) == doc_order(reference) == TRAINED
    assert [w.lineage for w in before + after] != []
    assert second.stage.status() == whole.stage.status()
    assert [(t.tolist(), d, k) for t, d, k in second.stage.holdout.fresh] == [(t.tolist(), d, k) for t, d, k in whole.stage.holdout.fresh]
    assert [p.tolist() for p in second.stage.holdout.probes] == [p.tolist() for p in whole.stage.holdout.probes]
    assert second.stage.packer.pending_tokens == whole.stage.packer.pending_tokens


def test_a_legacy_state_loads(make, tmp_path):
    write_stream(tmp_path / "stream")
    probe = make()
    probe.stage.poll_once()
    k = 4  # documents before the checkpoint
    offset = sum(len(line(i)) for i in IDS[:k])
    pending = [7, 8, 9, 10, 11]
    legacy = {  # daemon.json of format 1: tokens as JSON lists, the source's position as offsets
        "step": 3,
        "source": {"url": str(tmp_path / "stream"), "position": {"offsets": {"a.jsonl": offset}}},
        "packer": {"segments": [{"id": "old-doc", "domain": "default", "start": 16, "tokens": pending}]},
        "holdout_fresh": [{"tokens": [20, 21, 22], "domain": "default"}],
        "counters": {"documents": k, "held_out": 1, "dead_lettered": 2, "tokens_trained": 99},
        "replay": {},
        "served": {},
    }
    s = make()
    s.stage.load_state_dict({"legacy": json.loads(json.dumps(legacy)), "holdout_old": probe.stage.holdout.old.state_dict()})
    assert s.stage.packer.pending_tokens == len(pending)
    assert [(t.tolist(), d) for t, d, _ in s.stage.holdout.fresh] == [([20, 21, 22], "default")]
    st = s.stage.status()
    assert (st["documents"], st["held_out"], st["dead_lettered"]) == (k, 1, 2)
    poll_all(s.stage)  # reads on from the offset: documents k.. only
    assert s.stage.status()["documents"] == len(IDS)
    segs = [seg.doc_id for seg in s.stage.packer._segments]
    assert segs == ["old-doc"] + [i for i in TRAINED if i in IDS[k:]]
    assert s.stage.packer._segments[0].tokens.tolist() == pending and s.stage.packer._segments[0].start == 16
    state = s.stage.state_dict()  # and it is saved in the current format
    assert state["arrays"]["pending_tokens"].dtype == np.int32 and state["meta"]["source"]["position"]["format"] == 2


def test_a_state_taken_while_the_thread_runs_is_a_consistent_cut(make, tmp_path):
    write_stream(tmp_path / "stream")
    whole = make()
    poll_all(whole.stage)
    reference = take_all(whole.stage)

    running = make(max_records_per_poll=1, queue_windows=2)
    running.stage.start()
    before = [running.stage.take(1, timeout=10) for _ in range(3)]
    assert all(w is not None for w in before)
    state = round_trip(running.stage.state_dict())  # the thread reads on meanwhile
    running.stage.stop(timeout=5)

    resumed = make()
    resumed.stage.load_state_dict(state)
    poll_all(resumed.stage)
    after = take_all(resumed.stage)
    assert np.array_equal(tokens_of(before + after), tokens_of(reference))
    assert resumed.stage.status() == whole.stage.status()


def test_a_batch_whose_dead_letters_cannot_be_written_is_read_again(make, tmp_path):
    write_stream(tmp_path / "stream", extra=b"not json\n")
    whole = make()
    poll_all(whole.stage)
    expected = whole.stage.state_dict()

    s = make(max_records_per_poll=100, queue_windows=1000)
    real_write = s.dead.write
    calls = {"n": 0}

    def disk_full_once(rejections):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        real_write(rejections)

    s.dead.write = disk_full_once
    s.stage.start()
    assert wait_for(lambda: calls["n"] >= 2 and s.stage.status()["dead_lettered"] == 1)
    s.stage.stop(timeout=5)
    assert "source_error" in s.event_names()
    got = s.stage.state_dict()
    assert got["meta"]["counters"] == expected["meta"]["counters"]  # the good documents of that batch too
    assert got["meta"]["packer"] == expected["meta"]["packer"]
    assert [d["reason"] for d in s.dead_letters()] == ["bad_json"]


def test_a_queue_smaller_than_a_batch_is_refused_by_the_config(tmp_path):
    """Ingest stops reading at train.queue_windows windows: a batch larger than that could never fill."""
    with pytest.raises(ValueError, match="queue_windows"):
        Config(run_dir=str(tmp_path / "run"), train={"batch_size": 8, "queue_windows": 4})
