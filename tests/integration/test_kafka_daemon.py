"""The daemon on a Kafka topic, killed with -9 at random points and restarted: nothing lost, bad records dead-lettered.

The ledger is the lineage the train stage writes: documents take the default id
``topic:partition:offset``, so the surviving lineage says which record every
trained token came from. Every good record must be covered from its first token
to its last (or held out, or still pending in the newest checkpoint), no token
twice in what survived (steps after the last checkpoint are dropped by the resume
marker), and every bad record must be in the dead-letter file and on the
dead-letter topic with its origin and reason.
"""

import json
import os
import random
import signal
import time
import urllib.error
import urllib.request
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from everlearn.learners import CheckpointStore
from tests.e2e.helpers import DaemonProcess, get_json, tiny_config, wait_for
from tests.reliability.harness import (
    assert_nothing_lost,
    assert_only_verified_checkpoints,
    events,
    jsonl,
    man_docs,
)

pytestmark = pytest.mark.integration

BAD = [b"{not json", b"\xff\xfe binary", b'{"id": "no-text"}', b"[1, 2, 3]", b'{"text": ' + b"[" * 100 + b"]" * 100 + b"}"]
KILLS = 3


def test_killed_and_restarted_on_kafka_nothing_is_lost(kafka_broker, tmp_path, port_factory):
    topic, dlq = f"docs-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    admin.create_topics([NewTopic(topic, 3, 1), NewTopic(dlq, 1, 1)])
    admin.close()
    docs = man_docs(40_000)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    records = [json.dumps({"text": text}).encode() for _, text in docs]
    rng = random.Random(7)
    for bad in BAD:
        records.insert(rng.randrange(len(records)), bad)
    where: dict[int, tuple[int, int]] = {}  # record index -> (partition, offset)
    for i, value in enumerate(records):
        sent = producer.send(topic, value=value, partition=i % 3).get(10)
        where[i] = (sent.partition, sent.offset)
    producer.close()
    texts = {f"{topic}:{p}:{o}": records[i] for i, (p, o) in where.items()}
    good = {k: json.loads(v)["text"] for k, v in texts.items() if v not in BAD}
    bad_at = {k for k, v in texts.items() if v in BAD}

    metrics_port = port_factory()
    config = tiny_config(tmp_path, port_factory(), metrics_port,
                         source={"url": f"kafka://{kafka_broker.bootstrap}/{topic}", "max_records_per_poll": 16,
                                 "kafka": {"group_id": f"g-{uuid.uuid4().hex[:8]}", "dlq_topic": dlq, "session_timeout_ms": 6000,
                                           "heartbeat_interval_ms": 500, "request_timeout_ms": 5000}},
                         checkpoint={"every_steps": 5, "keep_last": 2}, gate={"every_steps": 10**6}, serve={"enabled": False},
                         train={"queue_windows": 16}, supervision={"stop_grace_s": 30})
    status = f"http://127.0.0.1:{metrics_port}/status"
    logs = []
    for n in range(KILLS + 1):
        logs.append(tmp_path / f"run{n}.log")
        daemon = DaemonProcess(config, log=logs[-1])
        try:
            if n < KILLS:  # kill -9 once it has trained a few steps past where it started
                start = wait_for(lambda: get_json(status)["state"] not in ("starting",) and get_json(status), 120, "ready", daemon)["step"]
                target = start + rng.randrange(3, 12)
                wait_for(lambda target=target: get_json(status)["step"] >= target, 120, f"step {target}", daemon)
                os.killpg(daemon.proc.pid, signal.SIGKILL)
                daemon.proc.wait(10)
            else:
                wait_for(lambda: get_json(status)["dead_lettered"] >= len(BAD) and get_json(status)["documents"] >= len(good)
                         and get_json(status)["pending_tokens"] < 8 * 64, 240, "the whole topic trained on", daemon)
                assert daemon.terminate() == 0, daemon.tail()
        finally:
            daemon.kill()
        time.sleep(0.5)

    run = tmp_path / "run"
    store = CheckpointStore(str(run / "checkpoints"))
    evs = [e for log in logs for e in events(log)]
    assert len([e for e in evs if e["event"] == "resumed"]) == KILLS
    assert_only_verified_checkpoints(store, evs)
    assert_nothing_lost(run, store, good, exact=True)
    # every bad record, with its reason, in the file and on the topic (at least once: a kill may repeat a poll)
    dead = jsonl(run / "dead_letter.jsonl")
    in_file = {f"{topic}:{d['provenance']['partition']}:{d['provenance']['offset']}": d["reason"] for d in dead}
    assert set(in_file) == bad_at and set(in_file.values()) == {"bad_json", "bad_utf8", "missing_text", "not_an_object", "too_deep"}
    c = KafkaConsumer(dlq, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    try:
        on_topic = {}
        for r in c:
            h = {k: v.decode() for k, v in r.headers}
            on_topic[f"{h['original_topic']}:{h['original_partition']}:{h['original_offset']}"] = h["reason"]
    finally:
        c.close()
    assert on_topic == in_file


def _healthz(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def test_a_broker_restarted_then_paused_for_a_minute_degrades_the_daemon_and_loses_nothing(persistent_kafka_broker, tmp_path,
                                                                                          port_factory):
    broker = persistent_kafka_broker
    topic = f"docs-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(topic, 3, 1)])
    admin.close()
    docs = man_docs(30_000)
    parts = [docs[i::3] for i in range(3)]
    ids: dict[str, str] = {}

    def produce(part):
        p = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for i, (_, text) in enumerate(part):
            sent = p.send(topic, value=json.dumps({"text": text}).encode(), partition=i % 3).get(30)
            ids[f"{topic}:{sent.partition}:{sent.offset}"] = text
        p.close()

    metrics_port = port_factory()
    config = tiny_config(tmp_path, port_factory(), metrics_port,
                         source={"url": f"kafka://{broker.bootstrap}/{topic}",
                                 "kafka": {"group_id": f"g-{uuid.uuid4().hex[:8]}", "session_timeout_ms": 6000,
                                           "heartbeat_interval_ms": 500, "request_timeout_ms": 3000, "probe_after_s": 1.0}},
                         checkpoint={"every_steps": 5, "keep_last": 2}, gate={"every_steps": 10**6}, serve={"enabled": False},
                         supervision={"degraded_after_s": 3, "backoff_base_s": 0.2, "backoff_max_s": 2})
    base = f"http://127.0.0.1:{metrics_port}"
    produce(parts[0])
    daemon = DaemonProcess(config, log=tmp_path / "run.log")
    try:
        wait_for(lambda: get_json(f"{base}/status")["documents"] >= len(parts[0]), 120, "the first part read", daemon)
        broker.stop()  # restarted: its data is on S3
        time.sleep(2)
        broker.start()
        produce(parts[1])
        wait_for(lambda: get_json(f"{base}/status")["documents"] >= len(parts[0]) + len(parts[1]), 120, "read after the restart", daemon)
        broker.proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        try:
            wait_for(lambda: get_json(f"{base}/status")["degraded"], 40, "degraded while the broker is paused", daemon)
            assert _healthz(base) == 503
            time.sleep(max(0.0, 60 - (time.monotonic() - paused)))
            assert daemon.proc.poll() is None
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: not get_json(f"{base}/status")["degraded"], 90, "healthy once the broker answers", daemon)
        assert _healthz(base) == 200
        produce(parts[2])
        wait_for(lambda: get_json(f"{base}/status")["documents"] >= len(docs) and get_json(f"{base}/status")["pending_tokens"] < 8 * 64,
                 180, "the whole topic trained on", daemon)
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        daemon.kill()
    evs = events(tmp_path / "run.log")
    assert any(e["event"] == "source_error" for e in evs) and any(e["event"] == "source_recovered" for e in evs)
    run = tmp_path / "run"
    store = CheckpointStore(str(run / "checkpoints"))
    assert_nothing_lost(run, store, ids, exact=True)
    assert not jsonl(run / "dead_letter.jsonl")
