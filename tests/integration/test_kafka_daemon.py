"""The daemon on a Kafka topic through what a service must absorb: kill -9, a broker restart, a broker paused half a minute.

One run, as a user runs it (``everlearn run``), on a 3-partition topic with bad
records among the documents, on a broker that keeps its data on S3 (so it can be
restarted): killed with -9 at two random steps and restarted each time; then,
in the last run, the broker is restarted, then paused (SIGSTOP) for 30 s, while
more records arrive between the harms.

The ledger is the lineage the train stage writes: documents take the default id
``topic:partition:offset``, so the surviving lineage says which record every
trained token came from. Every good record must be covered from its first token
to its last (or held out, or still pending in the newest checkpoint), no token
twice in what survived (steps after the last checkpoint are dropped by the resume
marker), and every bad record must be in the dead-letter file and on the
dead-letter topic with its origin and reason. While the broker is paused the
daemon stays up, reports ``degraded`` and fails /healthz; after, it is healthy.
"""

import json
import os
import random
import signal
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from everlearn.learners import CheckpointStore
from tests.e2e.helpers import DaemonProcess, get_json, healthz_status, tiny_config, wait_for
from tests.reliability.harness import (
    assert_nothing_lost,
    assert_only_verified_checkpoints,
    events,
    jsonl,
    man_docs,
)

pytestmark = pytest.mark.integration

BAD = [b"{not json", b"\xff\xfe binary", b'{"id": "no-text"}', b"[1, 2, 3]", b'{"text": ' + b"[" * 100 + b"]" * 100 + b"}"]
KILLS = 2
PAUSE_S = 30  # 10x the client's request timeout and 5x its session timeout below: requests and the group's session time out while paused


class Topic:
    """The topic and what was produced to it: good records by id (``topic:partition:offset``), bad ones' ids."""

    def __init__(self, broker):
        self.broker, self.name, self.dlq = broker, f"docs-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.create_topics([NewTopic(self.name, 3, 1), NewTopic(self.dlq, 1, 1)])
        admin.close()
        self.good: dict[str, str] = {}
        self.bad: set[str] = set()

    def produce(self, values: list[bytes]) -> None:
        p = KafkaProducer(bootstrap_servers=self.broker.bootstrap)
        for i, value in enumerate(values):
            sent = p.send(self.name, value=value, partition=i % 3).get(30)
            key = f"{self.name}:{sent.partition}:{sent.offset}"
            if value in BAD:
                self.bad.add(key)
            else:
                self.good[key] = json.loads(value)["text"]
        p.close()


def test_kill_9_a_broker_restart_and_a_paused_broker_lose_nothing(persistent_kafka_broker, tmp_path, port_factory):
    broker = persistent_kafka_broker
    topic = Topic(broker)
    rng = random.Random(7)
    docs = [json.dumps({"text": text}).encode() for _, text in man_docs(45_000)]
    first, second, third = docs[: len(docs) * 2 // 3], docs[len(docs) * 2 // 3 : len(docs) * 5 // 6], docs[len(docs) * 5 // 6 :]
    for bad in BAD:
        first.insert(rng.randrange(len(first)), bad)
    topic.produce(first)

    metrics_port = port_factory()
    config = tiny_config(tmp_path, port_factory(), metrics_port,
                         source={"url": f"kafka://{broker.bootstrap}/{topic.name}", "max_records_per_poll": 16,
                                 "kafka": {"group_id": f"g-{uuid.uuid4().hex[:8]}", "dlq_topic": topic.dlq, "session_timeout_ms": 6000,
                                           "heartbeat_interval_ms": 500, "request_timeout_ms": 3000, "probe_after_s": 1.0}},
                         checkpoint={"every_steps": 5, "keep_last": 2}, gate={"every_steps": 10**6}, serve={"enabled": False},
                         train={"queue_windows": 16},
                         supervision={"stop_grace_s": 30, "degraded_after_s": 3, "backoff_base_s": 0.2, "backoff_max_s": 2})
    base = f"http://127.0.0.1:{metrics_port}"

    def status():
        return get_json(f"{base}/status")

    logs = []
    for n in range(KILLS):  # kill -9 once it has trained a few steps past where it started
        logs.append(tmp_path / f"run{n}.log")
        daemon = DaemonProcess(config, log=logs[-1])
        try:
            start = wait_for(lambda: status()["state"] != "starting" and status(), 120, "ready", daemon)["step"]
            target = start + rng.randrange(3, 12)
            wait_for(lambda target=target: status()["step"] >= target, 120, f"step {target}", daemon)
            os.killpg(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait(10)
        finally:
            daemon.kill()
    logs.append(tmp_path / "last.log")
    daemon = DaemonProcess(config, log=logs[-1])
    try:
        wait_for(lambda: status()["state"] != "starting" and status()["step"] > 0, 120, "the last run training", daemon)
        broker.stop()  # its data is on S3: a restart keeps the topic
        time.sleep(2)
        broker.start()
        topic.produce(second)
        wait_for(lambda: status()["documents"] >= len(first) - len(BAD) + len(second), 120, "read after the broker restart", daemon)
        broker.proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        try:
            wait_for(lambda: status()["degraded"], 40, "degraded while the broker is paused", daemon)
            assert healthz_status(base) == 503
            time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused)))
            assert daemon.proc.poll() is None
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: not status()["degraded"], 90, "healthy once the broker answers", daemon)
        assert healthz_status(base) == 200
        topic.produce(third)
        wait_for(lambda: status()["documents"] >= len(topic.good) and status()["dead_lettered"] >= len(BAD)
                 and status()["pending_tokens"] < 8 * 64, 180, "the whole topic trained on", daemon)
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        daemon.kill()

    run = tmp_path / "run"
    store = CheckpointStore(str(run / "checkpoints"))
    evs = [e for log in logs for e in events(log)]
    assert len([e for e in evs if e["event"] == "resumed"]) == KILLS
    assert any(e["event"] == "source_error" for e in evs) and any(e["event"] == "source_recovered" for e in evs)
    assert_only_verified_checkpoints(store, evs)
    assert_nothing_lost(run, store, topic.good, exact=True)
    # every bad record, with its reason, in the file and on the topic (at least once: a kill may repeat a poll)
    dead = jsonl(run / "dead_letter.jsonl")
    in_file = {f"{topic.name}:{d['provenance']['partition']}:{d['provenance']['offset']}": d["reason"] for d in dead}
    assert set(in_file) == topic.bad and set(in_file.values()) == {"bad_json", "bad_utf8", "missing_text", "not_an_object", "too_deep"}
    c = KafkaConsumer(topic.dlq, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000)
    try:
        on_topic = {}
        for r in c:
            h = {k: v.decode() for k, v in r.headers}
            on_topic[f"{h['original_topic']}:{h['original_partition']}:{h['original_offset']}"] = h["reason"]
    finally:
        c.close()
    assert on_topic == in_file
