"""The Kafka source against a real Kafka-protocol broker (Tansu) on loopback.

Each test makes its own topic and consumer group. What is checked is what the
ingest stage relies on: every partition read from this run's position (never
the group's offsets), offsets committed only when asked, dead letters on their
topic with their origin, ids and domains from keys and headers, an outage that
raises instead of looking like an empty stream, a log shorter than the position
reported, and a second member of the group that takes nothing from this run.
"""

import json
import signal
import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from everlearn.daemon.kafka_config import KafkaConfig
from everlearn.daemon.metrics import Metrics
from everlearn.daemon.records import Document, Rejection, decode
from everlearn.daemon.source_kafka import KafkaSource
from everlearn.errors import SourceUnavailable

pytestmark = pytest.mark.integration

FAST = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 300, "request_timeout_ms": 3000}  # Tansu joins take half a session
BAD = [b"{not json", b"\xff\xfe binary", b'{"id": "no-text"}', b"[1, 2, 3]"]


def _topic(broker, partitions: int = 3) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()
    return name


def _produce(broker, topic: str, values: list[bytes], keys=None, headers=None, partitions: int = 3) -> None:
    p = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i, v in enumerate(values):
        p.send(topic, value=v, partition=i % partitions, key=keys[i] if keys else None, headers=headers[i] if headers else None)
    p.flush()
    p.close()


def _source(broker, topic: str, events: list | None = None, **kafka) -> KafkaSource:
    cfg = KafkaConfig(group_id=f"g-{uuid.uuid4().hex[:8]}", **{**FAST, "probe_after_s": 1.0, **kafka})
    return KafkaSource(f"kafka://{broker.bootstrap}/{topic}", cfg, Metrics(),
                       (lambda name, fields: events.append((name, fields))) if events is not None else None)


def _drain(src: KafkaSource, n: int, timeout: float = 40) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += src.poll(100, timeout_s=0.3)
    return got


def _docs(n: int) -> list[bytes]:
    return [json.dumps({"text": f"document number {i} " * 3}).encode() for i in range(n)]


def test_every_partition_is_read_from_the_run_position_never_the_group_offsets(kafka_broker):
    topic = _topic(kafka_broker)
    _produce(kafka_broker, topic, _docs(27) + BAD + _docs(2))  # 33 records over 3 partitions
    src = _source(kafka_broker, topic)
    try:
        raws = _drain(src, 33)
        assert len(raws) == 33 and src.position() == {"format": "kafka", "offsets": {topic: {"0": 11, "1": 11, "2": 11}}}
        decoded = [decode(r, 10_000) for r in raws]
        assert sorted(d.reason for d in decoded if isinstance(d, Rejection)) == ["bad_json", "bad_utf8", "missing_text", "not_an_object"]
        docs = [d for d in decoded if isinstance(d, Document)]
        assert len({d.id for d in docs}) == 29 and all(d.domain == topic for d in docs)  # default id topic:partition:offset
        assert {(r.provenance["partition"], r.provenance["offset"]) for r in raws} == {(p, o) for p in range(3) for o in range(11)}
        src.request_commit({"format": "kafka", "offsets": {topic: {"0": 2, "1": 2, "2": 2}}})  # the group now says 2
        src.poll(10, timeout_s=0.2)
    finally:
        src.close()
    # a restart of the run in the same group: from the checkpointed position, not from the group's committed 2
    again = KafkaSource(f"kafka://{kafka_broker.bootstrap}/{topic}", src.cfg, Metrics())
    again.seek({"format": "kafka", "offsets": {topic: {"0": 4, "1": 11, "2": 9}}})
    try:
        rest = _drain(again, 9)
        time.sleep(0.5)
        rest += again.poll(100, timeout_s=0.5)
        assert sorted((r.provenance["partition"], r.provenance["offset"]) for r in rest) == \
            [(0, o) for o in range(4, 11)] + [(2, 9), (2, 10)]
    finally:
        again.close()


def test_offsets_reach_the_group_only_when_a_durable_checkpoint_asks(kafka_broker):
    topic = _topic(kafka_broker)
    _produce(kafka_broker, topic, _docs(12))
    src = _source(kafka_broker, topic)
    probe = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=src.cfg.group_id, enable_auto_commit=False)
    try:
        _drain(src, 12)
        tps = [TopicPartition(topic, p) for p in range(3)]
        assert [probe.committed(tp) for tp in tps] == [None, None, None]  # reading commits nothing
        src.request_commit({"format": "kafka", "offsets": {topic: {"0": 3, "1": 4, "2": 1}}})
        src.poll(10, timeout_s=0.2)
        assert [probe.committed(tp) for tp in tps] == [3, 4, 1]
        assert src.metrics.registry.get_sample_value("everlearn_kafka_offset_commits_total") == 1
        lag = {p: src.metrics.registry.get_sample_value("everlearn_kafka_lag", {"topic": topic, "partition": str(p)}) for p in range(3)}
        assert lag == {0: 0, 1: 0, 2: 0}
        assert src.metrics.registry.get_sample_value("everlearn_kafka_records_total", {"topic": topic}) == 12
    finally:
        probe.close()
        src.close()


def test_dead_letters_go_to_their_topic_with_their_origin(kafka_broker):
    topic, dlq = _topic(kafka_broker), _topic(kafka_broker, 1)
    _produce(kafka_broker, topic, BAD[:3])
    src = _source(kafka_broker, topic, dlq_topic=dlq)
    try:
        rejected = [d for d in (decode(r, 10_000) for r in _drain(src, 3)) if isinstance(d, Rejection)]
        assert len(rejected) == 3
        src.dead_letter(rejected)
    finally:
        src.close()
    c = KafkaConsumer(dlq, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=2000)
    try:
        got = list(c)
    finally:
        c.close()
    assert sorted(r.value for r in got) == sorted(BAD[:3])
    for r in got:
        h = {k: v.decode() for k, v in r.headers}
        original = next(x for x in rejected if x.record.data == r.value)
        assert h["original_topic"] == topic and h["reason"] == original.reason
        assert (int(h["original_partition"]), int(h["original_offset"])) == (original.record.provenance["partition"],
                                                                          original.record.provenance["offset"])
        assert h["detail"]


def test_ids_and_domains_from_keys_and_headers(kafka_broker):
    topic = _topic(kafka_broker, 1)
    values = [b'{"text": "a", "id": "field-id", "domain": "field-domain"}', b'{"text": "b"}', b"plain text body"]
    keys = [b"key-0", None, b"\xff not utf-8"]
    headers = [[("src", b"news")], [("src", b"papers")], []]
    _produce(kafka_broker, topic, values, keys, headers, partitions=1)
    src = _source(kafka_broker, topic, id_from="key", domain_from="header:src")
    try:
        docs = [decode(r, 10_000) for r in _drain(src, 3)]
    finally:
        src.close()
    assert (docs[0].id, docs[0].domain) == ("key-0", "news")  # beside the record wins over its fields
    assert (docs[1].id, docs[1].domain) == (f"{topic}:0:1", "papers")  # no key: the default
    assert isinstance(docs[2], Rejection) and docs[2].reason == "bad_json"
    src = _source(kafka_broker, topic, value_format="text", id_from="offset", domain_from="topic")
    try:
        docs = [decode(r, 10_000) for r in _drain(src, 3)]
    finally:
        src.close()
    assert [d.id for d in docs] == [f"{topic}:0:{i}" for i in range(3)] and {d.domain for d in docs} == {topic}
    assert docs[2].text == "plain text body"


def test_a_position_beyond_the_log_is_reported_and_read_from_the_start(kafka_broker):
    topic = _topic(kafka_broker, 1)
    _produce(kafka_broker, topic, _docs(5), partitions=1)
    events: list = []
    src = _source(kafka_broker, topic, events)
    src.seek({"format": "kafka", "offsets": {topic: {"0": 50}}})  # e.g. the topic was deleted and made again
    try:
        got = _drain(src, 5)
    finally:
        src.close()
    assert [r.provenance["offset"] for r in got] == list(range(5))
    resets = [f for name, f in events if name == "kafka_offsets_reset"]
    assert len(resets) == 1 and resets[0]["position"] == 50 and resets[0]["log_end"] == 5


def test_a_second_member_of_the_group_takes_nothing_from_this_run(kafka_broker):
    topic = _topic(kafka_broker)
    _produce(kafka_broker, topic, _docs(30))
    slow = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500}  # two members taking turns need the longer session
    src = _source(kafka_broker, topic, **slow)
    other = None
    try:
        first = _drain(src, 12)
        other = KafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap, group_id=src.cfg.group_id, enable_auto_commit=True,
                              auto_offset_reset="earliest", **slow)
        deadline = time.monotonic() + 30
        while not other.assignment() and time.monotonic() < deadline:  # the group rebalances over both members
            other.poll(200)
            first += src.poll(100, timeout_s=0.2)
        assert other.assignment(), "the second consumer never got a partition"
        _produce(kafka_broker, topic, _docs(9))
        for _ in range(10):
            other.poll(200)
            first += src.poll(100, timeout_s=0.2)
        other.close()  # it leaves; its partitions come back to the run at the run's own offsets
        other = None
        first += _drain(src, 39 - len(first), timeout=60)
    finally:
        if other is not None:
            other.close()
        src.close()
    seen = sorted((r.provenance["partition"], r.provenance["offset"]) for r in first)
    assert seen == sorted({(p, o) for p in range(3) for o in range(13)}), "a record was lost or read twice"


def test_brokers_that_do_not_answer_raise_and_reading_resumes(kafka_broker):
    topic = _topic(kafka_broker, 1)
    _produce(kafka_broker, topic, _docs(4), partitions=1)
    src = _source(kafka_broker, topic)
    try:
        assert len(_drain(src, 4)) == 4
        kafka_broker.proc.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            with pytest.raises(SourceUnavailable, match="do not answer"):
                while time.monotonic() < deadline:
                    assert src.poll(10, timeout_s=0.2) == []
        finally:
            kafka_broker.proc.send_signal(signal.SIGCONT)
        _produce(kafka_broker, topic, _docs(3), partitions=1)
        got = _drain(src, 3)
        assert [r.provenance["offset"] for r in got] == [4, 5, 6]
    finally:
        src.close()


def test_a_topic_empty_at_the_start_is_read_once_records_arrive_at_the_ingest_threads_pace(kafka_broker):
    """The ingest thread polls without waiting and sleeps between empty polls: the group join must still complete."""
    topic = _topic(kafka_broker)
    cfg = KafkaConfig(group_id=f"g-{uuid.uuid4().hex[:8]}", session_timeout_ms=3000, heartbeat_interval_ms=300)  # else the defaults
    src = KafkaSource(f"kafka://{kafka_broker.bootstrap}/{topic}", cfg, Metrics())
    got, produced = [], False
    try:
        deadline = time.monotonic() + 40
        while len(got) < 6 and time.monotonic() < deadline:
            got += src.poll(64)  # timeout 0, as IngestStage.poll_once calls it
            if not produced and time.monotonic() > deadline - 37:
                _produce(kafka_broker, topic, _docs(6))
                produced = True
            time.sleep(1.0)  # source.poll_interval_s
    finally:
        src.close()
    assert len(got) == 6, f"{len(got)} of 6 records read; assigned: {src.assigned}"
