"""The ingest stage: source -> decode -> dead letter -> holdout -> tokenize -> pack, ahead of training.

A thread of its own polls the source and fills the packer, a bounded queue of
packed windows: it stops reading while ``train.queue_windows`` windows wait
(backpressure), so the learner never waits on listing, decoding or tokenizing
while the stream has data, and memory stays bounded.

Total: whatever a record holds, it becomes a document or a dead letter with a
reason. A source that fails is retried with backoff and jitter; its position
moves only with what was read, and a long outage marks the stage degraded.

The stage's state (``state_dict``) is one consistent cut, taken under the lock:
the source position after the last records that reached the packer, the
untrained tokens (arrays), the held-out windows and the counters.
"""

import threading
import time
from collections.abc import Callable
from typing import Any

from everlearn.daemon.config import Config
from everlearn.daemon.deadletter import DeadLetterSink
from everlearn.daemon.drift import DriftMonitor
from everlearn.daemon.holdout import HoldoutWindows, document_key
from everlearn.daemon.kafka_config import is_kafka
from everlearn.daemon.metrics import Metrics
from everlearn.daemon.records import Document, RawRecord, Rejection, decode
from everlearn.daemon.source_kafka import KafkaSource
from everlearn.daemon.sources import DirectorySource
from everlearn.deploy import Evidence
from everlearn.errors import SourceError
from everlearn.learners import Tokenizer, TokenPacker, Windows
from everlearn.retry import Backoff, is_transient

Events = Callable[..., None]


class IngestStage:
    def __init__(self, cfg: Config, tokenizer: Tokenizer, metrics: Metrics, events: Events,
                 dead_letters: DeadLetterSink, quarantined: set[str] | None = None, clock=time.monotonic):
        self.cfg, self.tokenizer, self.metrics, self.events = cfg, tokenizer, metrics, events
        self.dead_letters = dead_letters
        self.quarantined = quarantined if quarantined is not None else set()  # doc ids whose batch went non-finite
        self.clock = clock
        self.source = self._build_source()
        self.holdout = HoldoutWindows(cfg.holdout, cfg.train.seq_len, probes=cfg.gate.probe_sequences)
        self.packer = TokenPacker(cfg.train.seq_len, tokenizer.eos_id)
        self.drift = DriftMonitor(cfg.drift, tokenizer.vocab_size) if cfg.drift.enabled else None  # thread-safe: its own lock
        self.counters = {"documents": 0, "held_out": 0, "dead_lettered": 0}
        self.high_water = cfg.train.queue_windows * cfg.train.seq_len
        self._position: dict[str, Any] = self.source.position()
        self._cut_position: dict[str, Any] | None = None  # the position in the last state_dict (a checkpoint being written)
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        s = cfg.supervision
        self._backoff = Backoff(s.backoff_base_s, s.backoff_max_s)
        self.last_error: str | None = None

    def _build_source(self) -> DirectorySource | KafkaSource:
        s = self.cfg.source
        if is_kafka(s.url):
            return KafkaSource(s.url, s.kafka, self.metrics, self._source_event)
        return DirectorySource(s.url, s.storage_options, s.default_domain, max_line_bytes=s.max_doc_bytes,
                               settle_s=s.settle_s, close_after_s=s.close_after_s, events=self._source_event)

    def _source_event(self, name: str, fields: dict[str, Any]) -> None:
        """A file deleted, truncated, renamed, replaced, corrupt or late, a Kafka offset skipped or reset: counted and reported; the stream goes on."""
        self.metrics.source_events.labels(name).inc()
        self.events(name, **fields)

    # -- the thread ----------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="everlearn-ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop the thread, commit what the last durable checkpoint holds to the source (Kafka), close the source."""
        self.stop()
        if isinstance(self.source, KafkaSource):
            self.source.flush_commit()
        self.source.close()

    def durable(self) -> None:
        """The checkpoint holding the last state_dict is durable: a Kafka source may commit its offsets to the group."""
        if isinstance(self.source, KafkaSource) and self._cut_position is not None:
            self.source.request_commit(self._cut_position)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cv:  # backpressure: wait while the queue is full
                while self.packer.pending_tokens >= self.high_water and not self._stop.is_set():
                    self._cv.wait(0.5)
            if self._stop.is_set():
                return
            try:
                got = self.poll_once()
            except Exception as e:  # noqa: BLE001 nothing may end the thread: wait, then try again
                self._failed(e)
                continue
            if not got:
                self._stop.wait(self.cfg.source.poll_interval_s)

    def _failed(self, e: Exception) -> None:
        delay = self._backoff.next_delay()
        self.last_error = f"{type(e).__name__}: {e}"
        self.metrics.source_errors.inc()
        if self._backoff.failures == 1 or self._backoff.failures % 10 == 0:
            self.events("source_error", error=self.last_error, transient=is_transient(e) or isinstance(e, SourceError),
                        failures=self._backoff.failures, retry_in_s=round(delay, 2))
        self.metrics.degraded.labels("source").set(1 if self.degraded else 0)
        self._stop.wait(delay)

    @property
    def degraded(self) -> str | None:
        if self._backoff.failing_for() >= self.cfg.supervision.degraded_after_s:
            return f"source failing for {self._backoff.failing_for():.0f} s: {self.last_error}"
        return None

    # -- one poll ------------------------------------------------------------
    def poll_once(self) -> int:
        """Read one batch of records into the packer and the held-out windows; returns how many were read."""
        raws = self.source.poll(self.cfg.source.max_records_per_poll)
        position = self.source.position()  # taken with the batch: both reach the state together
        if self._backoff.failures:
            self.events("source_recovered", after_failures=self._backoff.failures)
            self._backoff.reset()
            self.metrics.degraded.labels("source").set(0)
        prepared = [self._prepare(raw) for raw in raws]
        rejected = [p for p in prepared if isinstance(p, Rejection)]
        if rejected:  # before the position moves on: a crash in between repeats them, never loses them
            try:
                self.dead_letters.write(rejected)
                if isinstance(self.source, KafkaSource):
                    self.source.dead_letter(rejected)  # the dead-letter topic too, when one is set
            except BaseException:
                self.source.seek(self._position)  # the source moved past the batch: back, so the retry reads it again
                raise
        domains: dict[str, int] = {}
        with self._cv:
            for item in prepared:
                if isinstance(item, Rejection):
                    self.metrics.documents_dead_lettered.labels(item.reason).inc()
                    self.counters["dead_lettered"] += 1
                else:
                    self._accept(*item)
                    domains[item[0].domain] = domains.get(item[0].domain, 0) + 1
            self._position = position
            self._cv.notify_all()
            if self.drift is not None:  # the whole stream, trained and held out; inside the cut a checkpoint takes
                for item in prepared:
                    if not isinstance(item, Rejection):
                        self.drift.observe_tokens(item[1])
        for domain, n in domains.items():  # once per domain and batch: a label look-up per record costs
            self.metrics.documents_ingested.labels(self.metrics.domain_label(domain)).inc(n)
        self.metrics.pending_tokens.set(self.packer.pending_tokens)
        self.metrics.ingest_queue_windows.set(self.packer.windows_ready())
        return len(raws)

    def _prepare(self, raw: RawRecord) -> "tuple[Document, Any] | Rejection":
        """Decode and tokenize one record; total: any failure becomes a rejection with its reason."""
        try:
            doc = decode(raw, self.cfg.source.max_doc_bytes, self.cfg.buffer.weight_field)
            if isinstance(doc, Rejection):
                return doc
            if doc.id in self.quarantined:
                return Rejection("quarantined", "its batch had a non-finite loss or gradient before; see quarantine.jsonl", raw)
            return doc, self.tokenizer.encode(doc.text)
        except Exception as e:  # noqa: BLE001 a bug or a tokenizer failure must not stop the stream
            return Rejection("internal_error", f"{type(e).__name__}: {e}"[:500], raw)

    def _accept(self, doc: Document, tokens) -> None:
        self.counters["documents"] += 1
        if self.holdout.is_held_out(doc.text):
            self.holdout.add(tokens, doc.domain, document_key(doc.text))
            self.counters["held_out"] += 1
            self.metrics.documents_held_out.inc()
        else:
            self.packer.add(doc.id, doc.domain, tokens, self._weight(doc), doc.provenance)

    def _weight(self, doc: Document) -> float | None:
        """A document's replay weight: its record's ``buffer.weight_field``, else its domain's (weighted by field only)."""
        if self.cfg.buffer.weight_field is None:
            return None
        return doc.weight if doc.weight is not None else self.cfg.buffer.domain_weights.get(doc.domain, 1.0)

    # -- what the trainer and the judge take ----------------------------------
    def take(self, n: int, timeout: float) -> Windows | None:
        """``n`` packed windows, waiting up to ``timeout`` for them; None when the stream has not delivered enough."""
        with self._cv:
            if not self._cv.wait_for(lambda: self.packer.windows_ready() >= n, timeout):
                return None
            windows = self.packer.take(n)
            self._cv.notify_all()  # room in the queue: the thread may read on
        self.metrics.ingest_queue_windows.set(self.packer.windows_ready())
        return windows

    def holdout_since(self, mark: int):
        """(tokens, lengths, document keys) of held-out sequences added after ``mark`` (``holdout.added`` then)."""
        with self._cv:
            return self.holdout.since(mark)

    def evidence(self, max_sequences: int) -> Evidence:
        with self._cv:
            return self.holdout.evidence(max_sequences)

    def status(self) -> dict[str, Any]:
        with self._cv:
            return {**self.counters, "pending_tokens": self.packer.pending_tokens,
                    "holdout": {"fresh": len(self.holdout.fresh), "old": len(self.holdout.old),
                                "old_domains": len(self.holdout.old.reservoirs), "probes": len(self.holdout.probes)}}

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """One consistent cut: arrays (pending tokens, fresh held-out window, probes), the old reservoirs, the rest as JSON."""
        with self._cv:
            packer, holdout = self.packer.state_dict(), self.holdout.state_dict()
            drift = self.drift.state_dict() if self.drift is not None else {"arrays": {}, "meta": None}
            self._cut_position = self._position
            return {
                "arrays": {**{f"pending_{k}": v for k, v in packer["arrays"].items()},
                           **{f"fresh_{k}": v for k, v in holdout["fresh"]["arrays"].items()},
                           **{f"probe_{k}": v for k, v in holdout["probes"]["arrays"].items()},
                           **{f"drift_{k}": v for k, v in drift["arrays"].items()}},
                "meta": {"source": {"url": self.cfg.source.url, "position": self._position}, "packer": packer["meta"],
                         "holdout_fresh": holdout["fresh"]["meta"], "counters": dict(self.counters), "drift": drift["meta"]},
                "holdout_old": holdout["old"],
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cut taken by ``state_dict`` (call while the thread is stopped)."""
        if "legacy" in state:  # a checkpoint of format 1: token lists inside daemon.json
            meta = state["legacy"]
            packer, fresh, probes = meta["packer"], meta["holdout_fresh"], None
        else:
            arrays, meta = state["arrays"], state["meta"]
            packer = {"arrays": {"tokens": arrays["pending_tokens"], "lengths": arrays["pending_lengths"]}, "meta": meta["packer"]}
            fresh = {"arrays": _prefixed(arrays, "fresh_"), "meta": meta["holdout_fresh"]}
            probes = {"arrays": _prefixed(arrays, "probe_")} if "probe_tokens" in arrays else None  # none before probes
        with self._cv:
            self.packer.load_state_dict(packer)
            self.holdout.load_state_dict({"fresh": fresh, "old": state["holdout_old"], "probes": probes})
            if not isinstance(self.source, KafkaSource):  # a Kafka consumer stays in its group: it only seeks
                self.source = self._build_source()
            self.source.seek(meta["source"]["position"])
            self._position = self.source.position()
            self.counters.update(meta.get("counters", {}))
            if "legacy" not in state and meta.get("drift"):  # none before drift monitoring, or with it off
                self._load_drift({"arrays": _prefixed(state["arrays"], "drift_"), "meta": meta["drift"]})

    def _load_drift(self, state: dict[str, Any]) -> None:
        """The drift monitor's state, or a fresh monitor when the state does not fit (another vocabulary, a damaged ring)."""
        if self.drift is None:
            return
        try:
            self.drift.load_state_dict(state)
        except (ValueError, KeyError) as e:
            self.drift = DriftMonitor(self.cfg.drift, self.tokenizer.vocab_size)
            self.events("drift_state_dropped", reason=str(e)[:300])


def _prefixed(arrays: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The arrays named ``prefix<name>``, by ``name``."""
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
