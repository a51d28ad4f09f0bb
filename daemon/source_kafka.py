"""A ``kafka://`` source: every partition of the configured topics, as raw bytes, from offsets the run checkpoint holds.

The consumer group only assigns partitions: each newly assigned partition is
sought to this run's position (``seek``, from the run checkpoint), never to the
group's committed offsets; a partition the run has never read starts at
``source.kafka.start``. Values reach ``records.decode`` as bytes (no client-side
deserializer), so a bad record becomes a dead letter instead of stalling the
consumer. The position is ``{"format": "kafka", "offsets": {topic: {partition:
next offset}}}``; it only moves over records that were delivered.

Offsets are committed to the group only for a position a durable checkpoint
holds (``request_commit``; done by the ingest thread, which owns the consumer):
for lag dashboards and other tools, never read back. Dead letters also go to
``source.kafka.dlq_topic`` when set, with their origin in headers.

What is reported rather than hidden (events, metrics): offsets retention deleted
before they were read (``kafka_offsets_skipped``: the range), a partition whose
log is now shorter than the position (``kafka_offsets_reset``: the broker lost
data or the topic was recreated; read again from its start), every assignment
(``kafka_assigned``), commits that failed (``kafka_commit_failed``). Brokers that
do not answer raise ``SourceUnavailable`` (the ingest stage retries with backoff
and reports ``degraded``); kafka-python reconnects by itself meanwhile.
"""

import logging
import threading
import time
from typing import Any

from kafka import (
    ConsumerRebalanceListener,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.errors import KafkaError, OffsetOutOfRangeError

from everlearn.daemon.kafka_config import KafkaConfig, parse_url
from everlearn.daemon.records import RawRecord, Rejection
from everlearn.errors import SourceUnavailable

log = logging.getLogger(__name__)
FORMAT = "kafka"


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: "KafkaSource"):
        self.source = source

    def on_partitions_revoked(self, revoked) -> None:
        self.source.assigned -= set(revoked)

    def on_partitions_assigned(self, assigned) -> None:
        s = self.source
        s.assigned = set(assigned)
        if s.metrics is not None:
            s.metrics.kafka_rebalances.inc()
        s.events("kafka_assigned", {"partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned)})
        for tp in assigned:
            s.seek_partition(tp)


class KafkaSource:
    def __init__(self, url: str, cfg: KafkaConfig, metrics=None, events=None, clock=time.monotonic):
        self.servers, self.topics = parse_url(url)
        self.cfg, self.metrics, self.clock = cfg, metrics, clock
        self.events = events or (lambda name, fields: log.warning("%s %s", name, fields))
        self.offsets: dict[TopicPartition, int] = {}  # next offset to deliver, per partition this run has read
        self.assigned: set[TopicPartition] = set()
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._to_commit: dict[str, Any] | None = None
        self._last_answer = clock()

    # -- the Source contract ---------------------------------------------------
    def position(self) -> dict[str, Any]:
        offsets: dict[str, dict[str, int]] = {}
        for tp, off in sorted(self.offsets.items()):
            offsets.setdefault(tp.topic, {})[str(tp.partition)] = off
        return {"format": FORMAT, "offsets": offsets}

    def seek(self, position: dict[str, Any]) -> None:
        if position.get("format") != FORMAT:  # a new run, or one that followed another kind of source before
            position = {"offsets": {}}
        self.offsets = {TopicPartition(t, int(p)): int(o) for t, parts in position["offsets"].items() for p, o in parts.items()}
        if self._consumer is not None:
            for tp in self.assigned:
                self.seek_partition(tp)

    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[RawRecord]:
        c = self._consumer or self._connect()
        self._commit_requested(c)
        # Joining the group takes one uninterrupted wait (a poll that times out first starts the join over):
        # without partitions, wait up to a session timeout
        wait_ms = max(100, int(timeout_s * 1000)) if self.assigned else self.cfg.session_timeout_ms
        try:
            batch = c.poll(timeout_ms=wait_ms, max_records=max_records)
        except OffsetOutOfRangeError as e:
            self._out_of_range(c, e.args[0] if e.args and isinstance(e.args[0], dict) else {})
            return []
        except KafkaError as e:
            raise SourceUnavailable(f"Kafka poll from {','.join(self.servers)} failed: {type(e).__name__}: {e}") from e
        out = []
        for tp, records in batch.items():
            nxt = self.offsets.get(tp)
            fresh = [r for r in records if nxt is None or r.offset >= nxt]  # a rebalance may fetch again what was delivered
            out += [self._raw(r) for r in fresh]
            if fresh:
                self.offsets[tp] = fresh[-1].offset + 1
                if self.metrics is not None:
                    self.metrics.kafka_records.labels(tp.topic).inc(len(fresh))
                    self.metrics.kafka_bytes.labels(tp.topic).inc(sum(len(r.value or b"") for r in fresh))
        now = self.clock()
        if out:
            self._last_answer = now
        elif now - self._last_answer >= self.cfg.probe_after_s:  # an empty stream, or brokers that do not answer?
            try:
                c.topics()
            except KafkaError as e:
                raise SourceUnavailable(f"Kafka brokers {','.join(self.servers)} do not answer: {type(e).__name__}: {e}") from e
            self._last_answer = now
        self._check_ends(c)
        return out

    def close(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                try:
                    client.close(timeout=5) if isinstance(client, KafkaProducer) else client.close(autocommit=False)
                except Exception as e:  # noqa: BLE001 closing a client of a dead broker must not stop a shutdown
                    log.warning("closing the Kafka client: %s", e)
        self._consumer = self._producer = None

    # -- beyond the contract: commits and dead letters ---------------------------
    def request_commit(self, position: dict[str, Any]) -> None:
        """Commit ``position`` to the group on the next poll (any thread): a durable checkpoint holds it."""
        with self._lock:
            self._to_commit = position

    def flush_commit(self) -> None:
        """Do a requested commit now (the ingest thread is stopped: this thread may use the consumer)."""
        if self._consumer is not None:
            self._commit_requested(self._consumer)

    def dead_letter(self, rejections: list[Rejection]) -> None:
        """Produce the rejected records to ``dlq_topic`` with their origin; raises SourceUnavailable when not acknowledged."""
        if not self.cfg.dlq_topic or not rejections:
            return
        if self._producer is None:
            try:
                self._producer = KafkaProducer(**self.cfg.client_kwargs(self.servers), acks="all", linger_ms=5)
            except KafkaError as e:
                raise SourceUnavailable(f"cannot reach Kafka for the dead-letter topic {self.cfg.dlq_topic}: {e}") from e
        futures = []
        for rej in rejections:
            p = rej.record.provenance
            headers = [("original_topic", str(p.get("topic", ""))), ("original_partition", str(p.get("partition", ""))),
                       ("original_offset", str(p.get("offset", ""))), ("reason", rej.reason), ("detail", rej.detail[:1000])]
            futures.append(self._producer.send(self.cfg.dlq_topic, value=rej.record.data,
                                               headers=[(k, v.encode()) for k, v in headers]))
        try:
            self._producer.flush(timeout=self.cfg.request_timeout_ms / 1000)
            for f in futures:
                f.get(timeout=0)
        except KafkaError as e:
            raise SourceUnavailable(f"dead letters to Kafka topic {self.cfg.dlq_topic} not acknowledged: {e}") from e
        if self.metrics is not None:
            self.metrics.kafka_dead_letters.inc(len(rejections))

    # -- inside ------------------------------------------------------------------
    def _connect(self) -> KafkaConsumer:
        k = self.cfg
        try:
            c = KafkaConsumer(**k.client_kwargs(self.servers), group_id=k.group_id, enable_auto_commit=False, metadata_max_age_ms=5000,
                              auto_offset_reset="none", session_timeout_ms=k.session_timeout_ms,
                              heartbeat_interval_ms=k.heartbeat_interval_ms)
        except KafkaError as e:
            raise SourceUnavailable(f"cannot reach Kafka brokers {','.join(self.servers)}: {type(e).__name__}: {e}") from e
        c.subscribe(self.topics, listener=_Listener(self))
        self._consumer, self._last_answer = c, self.clock()
        return c

    def seek_partition(self, tp: TopicPartition) -> None:
        c, off = self._consumer, self.offsets.get(tp)
        if off is not None:
            c.seek(tp, off)
        elif self.cfg.start == "earliest":
            c.seek_to_beginning(tp)
        else:
            c.seek_to_end(tp)

    def _raw(self, r) -> RawRecord:
        where = f"{r.topic}:{r.partition}:{r.offset}"
        prov = {"topic": r.topic, "partition": r.partition, "offset": r.offset, "timestamp": r.timestamp}
        return RawRecord(r.value if r.value is not None else b"", "jsonl" if self.cfg.value_format == "json" else "txt", prov,
                         where, r.topic, self._beside(self.cfg.id_from, r, where), self._beside(self.cfg.domain_from, r, where))

    @staticmethod
    def _beside(mode: str, r, where: str) -> str | bytes | None:
        """The id or domain read outside the value (None: from the record's field, else the default)."""
        if mode == "key":
            return r.key
        if mode == "offset":
            return where
        if mode == "topic":
            return r.topic
        if mode.startswith("header:"):
            name = mode.split(":", 1)[1]
            return next((v for k, v in (r.headers or []) if k == name), None)
        return None

    def _commit_requested(self, c: KafkaConsumer) -> None:
        with self._lock:
            position, self._to_commit = self._to_commit, None
        if position is None or position.get("format") != FORMAT:
            return
        offsets = {tp: OffsetAndMetadata(off, "", -1) for t, parts in position["offsets"].items() for p, off in parts.items()
                   if (tp := TopicPartition(t, int(p))) in self.assigned}
        if not offsets:
            return
        try:
            c.commit(offsets)
        except KafkaError as e:  # a later checkpoint commits again; positions never come from the group anyway
            self.events("kafka_commit_failed", {"error": f"{type(e).__name__}: {e}"[:300]})
            return
        if self.metrics is not None:
            self.metrics.kafka_commits.inc()

    def _out_of_range(self, c: KafkaConsumer, parts: dict) -> None:
        """The position lies outside a partition's log: deleted by retention (skip to its start, say so) or beyond it."""
        try:
            starts = c.beginning_offsets(list(parts))
        except KafkaError as e:
            raise SourceUnavailable(f"Kafka offset look-up failed: {e}") from e
        for tp, off in parts.items():
            start = starts.get(tp, 0)
            if off < start:
                self.events("kafka_offsets_skipped", {"topic": tp.topic, "partition": tp.partition, "from": off, "to": start,
                                                      "records": start - off})
                if self.metrics is not None:
                    self.metrics.kafka_skipped.labels(tp.topic).inc(start - off)
                c.seek(tp, start)
                self.offsets[tp] = start
            else:
                self._reset(c, tp, off, None)

    def _reset(self, c: KafkaConsumer, tp: TopicPartition, off: int, end: int | None) -> None:
        self.events("kafka_offsets_reset", {"topic": tp.topic, "partition": tp.partition, "position": off, "log_end": end,
                                            "why": "the partition's log ends before this run's position (data lost or topic "
                                                   "recreated): reading it again from its start"})
        c.seek_to_beginning(tp)
        self.offsets.pop(tp, None)

    def _check_ends(self, c: KafkaConsumer) -> None:
        for tp in list(self.assigned):
            end, off = c.highwater(tp), self.offsets.get(tp)
            if end is None or off is None:
                continue
            if off > end:
                self._reset(c, tp, off, end)
            elif self.metrics is not None:
                self.metrics.kafka_lag.labels(tp.topic, str(tp.partition)).set(end - off)
