"""The daemon: one run's loop from stream to served model.

    poll source -> decode (bad -> dead letter) -> hold out by hash(id) or pack
    -> mix replay -> learner.train_step (Ray actor) -> reservoir
    -> every K steps: checkpoint; judge candidate with the gates; promote by hot swap

All of the run's state is in the checkpoint: the learner's weights, optimizer
and step; the replay buffer; the held-out windows; the source position and the
packer's untrained tokens. A restart from it trains every document exactly once.
"""

import hashlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from everlearn.buffers import build_buffer
from everlearn.buffers.persist import from_files, to_files
from everlearn.daemon.config import Config
from everlearn.daemon.deadletter import DeadLetterSink
from everlearn.daemon.demo import seed_demo_stream
from everlearn.daemon.holdout import HoldoutWindows
from everlearn.daemon.http import StatusServer
from everlearn.daemon.metrics import Metrics
from everlearn.daemon.progress import Progress
from everlearn.daemon.records import Document, Rejection, decode
from everlearn.daemon.sources import DirectorySource
from everlearn.deploy import AuditLog, GateResult, LossGate, Server
from everlearn.errors import CheckpointError, ConfigError
from everlearn.learners import (
    CheckpointRef,
    CheckpointStore,
    Learner,
    ReplayMixer,
    ReplaySchedule,
    TokenPacker,
    build_tokenizer,
)

DAEMON_STATE = "daemon.json"
SERVED = "SERVED.json"  # beside LATEST: the promoted version, the source of truth for serving


class Daemon:
    """Runs one everlearn run until stopped or ``max_steps`` steps.

    Boundaries are parameters: the metrics ``registry``, the ``out`` stream,
    the ``clock``. ``stop`` is an Event that ends the run cleanly (checkpoint,
    then shutdown) when set, as SIGINT/SIGTERM do.
    """

    def __init__(self, cfg: Config, registry=None, out=None, clock=time.monotonic, stop: threading.Event | None = None):
        self.cfg = cfg
        self.clock = clock
        self.stop_event = stop or threading.Event()
        self.metrics = Metrics(registry)
        self.progress = Progress(out, interval_s=cfg.log.interval_s)
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = CheckpointStore(cfg.checkpoint_url, cfg.checkpoint.storage_options)
        self.tokenizer = build_tokenizer(cfg.model)
        self.buffer = build_buffer(cfg.buffer, cfg.train.seq_len)
        b = cfg.buffer
        replay = ReplaySchedule(b.replay_fraction, b.replay_boost, b.boost_steps, b.shift_window, b.shift_threshold)
        self.mixer = ReplayMixer(self.buffer, replay, cfg.train.batch_size)
        self.packer = TokenPacker(cfg.train.seq_len, self.tokenizer.eos_id)
        self.holdout = HoldoutWindows(cfg.holdout, cfg.train.seq_len)
        self.dead_letters = DeadLetterSink(self.run_dir / "dead_letter.jsonl")
        self.audit = AuditLog(self.run_dir / "audit.jsonl")
        self.lineage_path = self.run_dir / "lineage.jsonl"
        self.source: DirectorySource | None = None
        self.learner = None
        self.server: Server | None = None
        self.status_server: StatusServer | None = None
        self.step = 0
        self.served: dict[str, Any] = {}
        self.last_gate: dict[str, Any] | None = None
        self.last_checkpoint: CheckpointRef | None = None
        self.counters = {"documents": 0, "held_out": 0, "dead_lettered": 0, "tokens_trained": 0}
        self.state = "starting"
        self._loss: float | None = None
        self._lr: float | None = None
        self._tok_rate = 0.0
        self._last_step_t: float | None = None
        self._ray_started = False
        self.resumed_from: CheckpointRef | None = None

    # -- status ------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "step": self.step,
            "tokens_per_s": round(self._tok_rate, 1),
            "loss": self._loss,
            "lr": self._lr,
            "buffer": {"size": len(self.buffer), "capacity": self.buffer.capacity, "seen": self.buffer.seen,
                       "tokens": self.buffer.tokens_held, "replay_fraction": round(self.mixer.schedule(self.step), 4),
                       "last_shift_step": self.mixer.schedule.shift_step},
            "served_version": self.served.get("version"),
            "served_step": self.served.get("step"),
            "last_gate": self.last_gate,
            "last_checkpoint": self.last_checkpoint.name if self.last_checkpoint else None,
            "pending_tokens": self.packer.pending_tokens,
            "holdout": {"fresh": len(self.holdout.fresh), "old": len(self.holdout.old)},
            "serving_url": self.server.url if self.server else None,
            "resumed_from_step": self.resumed_from.step if self.resumed_from else None,
            **self.counters,
        }

    # -- lifecycle -----------------------------------------------------------
    def _start_ray(self) -> None:
        if ray.is_initialized():
            return
        rc = self.cfg.ray
        if rc.address:
            ray.init(address=rc.address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=rc.num_cpus,
                object_store_memory=rc.object_store_memory_mb * 2**20,
                include_dashboard=rc.include_dashboard,
                log_to_driver=False,
                configure_logging=False,
            )
        self._ray_started = True

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, _frame):
            self.progress.event("stopping", signal=signal.Signals(signum).name)
            self.stop_event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def _seed_demo(self) -> None:
        url = self.cfg.source.url
        if not self.cfg.demo.seed_if_empty or "://" in url and not url.startswith("file://"):
            return
        directory = Path(url.removeprefix("file://"))
        if directory.exists() and any(p.suffix in (".jsonl", ".txt") for p in directory.rglob("*")):
            return
        files = seed_demo_stream(directory, self.cfg.demo.bytes_per_domain)
        self.progress.event("demo", seeded=str(directory), files=[f.name for f in files])

    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        """Run until stopped or ``max_steps`` more steps; returns the final status."""
        self._seed_demo()
        self._start_ray()
        self._install_signal_handlers()
        try:
            self._open()
            self._loop(max_steps)
            self.state = "stopping"
            self._checkpoint()
        finally:
            self._close()
        return self.status()

    def _open(self) -> None:
        cfg = self.cfg
        try:
            self.status_server = StatusServer(cfg.metrics.host, cfg.metrics.port, self.metrics.registry, self.status).start()
        except OSError as e:
            raise ConfigError(f"cannot listen on metrics.host:metrics.port = {cfg.metrics.host}:{cfg.metrics.port} ({e}); "
                              "is another daemon running? Set metrics.port to a free port (0 picks one)") from e
        self.source = DirectorySource(cfg.source.url, cfg.source.storage_options, cfg.source.default_domain, max_line_bytes=cfg.source.max_doc_bytes)
        actor = ray.remote(Learner).options(num_cpus=cfg.train.num_cpus, num_gpus=cfg.train.num_gpus, name=None)
        self.learner = actor.remote(cfg.model, cfg.train, cfg.schedule, cfg.checkpoint_url, cfg.checkpoint.storage_options)
        ref = self.store.latest()
        if ref is not None:
            self._restore(ref)
        else:
            ref = self._checkpoint(force=True)  # step 0: the version serving starts on
            self.served = self._promoted_record(0, ref)
            self._write_served()
        self.metrics.buffer_capacity.set(self.buffer.capacity)
        self.metrics.buffer_capacity_tokens.set(self.buffer.capacity * self.buffer.seq_len)
        self._publish_served()
        self.server = Server(cfg.model, cfg.serve, cfg.checkpoint.storage_options)
        self.server.start(self.served)
        self.state = "running"
        self.progress.event("ready", step=self.step, serving=self.server.url, served_version=self.served["version"],
                            metrics=self.status_server.url + "/metrics", stream=cfg.source.url)

    def _close(self) -> None:
        self.progress.close()
        if self.server is not None and not self._ray_started:  # a local Ray takes Serve down with it
            try:
                self.server.stop()
            except Exception as e:  # noqa: BLE001 shutdown must go on
                self.progress.event("warning", message=f"serve shutdown: {e}")
        if self.status_server is not None:
            self.status_server.stop()
        if self._ray_started:
            ray.shutdown()
        self.state = "stopped"

    # -- the loop ------------------------------------------------------------
    def _loop(self, max_steps: int | None) -> None:
        taken = 0
        while not self.stop_event.is_set() and (max_steps is None or taken < max_steps):
            if self.packer.windows_ready() < self.mixer.n_fresh(self.step):
                got = self._ingest()
                if self.packer.windows_ready() < self.mixer.n_fresh(self.step):
                    if not got:
                        self.state = "idle: waiting for documents"
                        self.progress.update(self.status())
                        self.stop_event.wait(self.cfg.source.poll_interval_s)
                    continue
            self.state = "training"
            self._train_one()
            taken += 1
            if self.step % self.cfg.gate.every_steps == 0:
                self._judge()
            elif self.step % self.cfg.checkpoint.every_steps == 0:
                self._checkpoint()
            self.progress.update(self.status())

    def _ingest(self) -> int:
        raws = self.source.poll(self.cfg.source.max_records_per_poll)
        rejected: list[Rejection] = []
        for raw in raws:
            doc = decode(raw, self.cfg.source.max_doc_bytes, self.cfg.buffer.weight_field)
            if isinstance(doc, Rejection):
                rejected.append(doc)
                continue
            self._accept(doc)
        if rejected:
            self.dead_letters.write(rejected)
            for r in rejected:
                self.metrics.documents_dead_lettered.labels(r.reason).inc()
            self.counters["dead_lettered"] += len(rejected)
        self.metrics.pending_tokens.set(self.packer.pending_tokens)
        return len(raws)

    def _accept(self, doc: Document) -> None:
        tokens = self.tokenizer.encode(doc.text)
        self.counters["documents"] += 1
        self.metrics.documents_ingested.labels(doc.domain).inc()
        if self.holdout.is_held_out(doc.id):
            self.holdout.add(tokens, doc.domain)
            self.counters["held_out"] += 1
            self.metrics.documents_held_out.inc()
        else:
            self.packer.add(doc.id, doc.domain, tokens, self._weight(doc))

    def _weight(self, doc: Document) -> float | None:
        """A document's replay weight: its record's ``buffer.weight_field``, else its domain's (weighted by field only)."""
        if self.cfg.buffer.weight_field is None:
            return None
        return doc.weight if doc.weight is not None else self.cfg.buffer.domain_weights.get(doc.domain, 1.0)

    def _train_one(self) -> None:
        trained = self.step
        fresh, lineage, domains, weights = self.packer.take(self.mixer.n_fresh(trained))
        tokens, lengths, n_replay = self.mixer.mix(fresh)
        stats = ray.get(self.learner.train_step.remote(tokens, lengths))
        if self.mixer.remember(fresh, domains, trained, weights):
            self.metrics.domain_mix_shifts.inc()
            self.progress.event("domain_shift", step=stats.step, distance=round(self.mixer.schedule.detector.distance, 3),
                                replay_fraction=round(self.mixer.schedule(stats.step), 4))
        self.step = stats.step
        now = self.clock()
        if self._last_step_t is not None:
            rate = stats.tokens / max(now - self._last_step_t, 1e-6)
            self._tok_rate = rate if self._tok_rate == 0 else 0.9 * self._tok_rate + 0.1 * rate
        self._last_step_t = now
        self._loss, self._lr = stats.loss, stats.lr
        self.counters["tokens_trained"] += stats.tokens
        m = self.metrics
        m.train_steps.inc()
        m.step.set(stats.step)
        m.tokens_trained.inc(stats.tokens)
        m.tokens_replayed.inc(int(lengths[len(fresh):].sum()))
        m.replay_fraction.set(n_replay / len(tokens))
        m.loss.set(stats.loss)
        m.learning_rate.set(stats.lr)
        m.step_seconds.observe(stats.seconds)
        m.buffer_sequences.set(len(self.buffer))
        m.buffer_seen.set(self.buffer.seen)
        m.buffer_duplicates.set(self.buffer.duplicates)
        m.buffer_tokens.set(self.buffer.tokens_held)
        if self.step % 10 == 0 or self.step < 10:  # a bincount over the buffer: every few steps is plenty
            for domain, count in self.buffer.domain_counts().items():
                m.buffer_domain.labels(domain or "unknown").set(count)
        m.pending_tokens.set(self.packer.pending_tokens)
        if self.cfg.log.lineage:
            spans = [[s.doc_id, s.start, s.end] for window in lineage for s in window]
            self._append_lineage({"step": stats.step, "replayed": n_replay, "spans": spans})

    def _append_lineage(self, record: dict[str, Any]) -> None:
        with open(self.lineage_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints -----------------------------------------------------------
    def _checkpoint(self, force: bool = False) -> CheckpointRef:
        """Commit a checkpoint of the whole run at the current step (once per step)."""
        if not force and self.last_checkpoint is not None and self.last_checkpoint.step == self.step:
            return self.last_checkpoint
        t0 = time.perf_counter()
        files = ray.get(self.learner.save.remote(self.step))
        for prefix, part in (("buffer", self.buffer.state_dict()), ("holdout_old", self.holdout.old.state_dict())):
            for name, data in to_files(prefix, part, self.cfg.buffer.shard_mb << 20).items():
                files[name] = self.store.put(self.step, name, data)
        state = {
            "step": self.step,
            "source": {"url": self.cfg.source.url, "position": self.source.position()},
            "packer": self.packer.state_dict(),
            "replay": self.mixer.schedule.state_dict(),
            "holdout_fresh": self.holdout.state_dict()["fresh"],
            "served": self.served,
            "counters": self.counters,
        }
        files[DAEMON_STATE] = self.store.put(self.step, DAEMON_STATE, json.dumps(state).encode())
        ref = self.store.commit(self.step, files, meta={"served_version": self.served.get("version")})
        self.last_checkpoint = ref
        protect = {self.served["name"]} if self.served.get("name") else set()
        self.store.sweep(self.cfg.checkpoint.keep_last, protect=protect | {ref.name})
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        return ref

    def _restore(self, ref: CheckpointRef) -> None:
        try:
            self._load_run_state(ref)
        except (ValueError, KeyError, RuntimeError) as e:  # shapes or fields that do not fit this config
            raise ConfigError(
                f"cannot resume from {ref.uri}: {e}. The run in {self.cfg.run_dir} was made with another model, "
                "train.seq_len or buffer/holdout capacity; use the config it was made with, or a new run_dir"
            ) from e
        self.last_checkpoint = self.resumed_from = ref
        if self.cfg.log.lineage:  # steps after this one, if any, were lost with the process that took them
            self._append_lineage({"resumed_from_step": self.step})
        self.progress.event("resumed", step=self.step, checkpoint=ref.uri, buffer=len(self.buffer),
                            buffer_sha256=buffer_digest(self.buffer), served_version=self.served.get("version"))

    def _load_run_state(self, ref: CheckpointRef) -> None:
        self.step = ray.get(self.learner.load.remote(ref))
        state = json.loads(self.store.read(ref, DAEMON_STATE))
        for prefix, target in (("buffer", self.buffer), ("holdout_old", self.holdout.old)):
            target.load_state_dict(from_files(prefix, lambda name: self.store.read(ref, name)))
        self.holdout.load_state_dict({"fresh": state["holdout_fresh"], "old": self.holdout.old.state_dict()})
        self.packer.load_state_dict(state["packer"])
        self.mixer.schedule.load_state_dict(state.get("replay", {}))
        self.source.seek(state["source"]["position"])
        self.counters.update(state.get("counters", {}))
        self.served = self._read_served() or state["served"]

    # -- gates and promotion ---------------------------------------------------
    def _judge(self) -> None:
        ev = self.holdout.evidence(self.cfg.gate.max_eval_sequences)
        candidate = self._checkpoint()
        serving = CheckpointRef.from_dict(self.served)
        record: dict[str, Any] = {"step": self.step, "candidate": candidate.to_dict(), "serving": serving.to_dict(),
                                  "serving_version": self.served["version"]}
        if len(ev.fresh_tokens) < self.cfg.gate.min_fresh_sequences:
            result = GateResult(False, f"skipped: fresh window holds {len(ev.fresh_tokens)} < gate.min_fresh_sequences={self.cfg.gate.min_fresh_sequences} sequences")
            verdict = "skipped"
        else:
            gate = LossGate(self.cfg.gate, self._loss_of)
            result = gate.evaluate(candidate, serving, ev)
            verdict = "promoted" if result.passed else "rejected"
            for key, value in result.metrics.items():
                if key.endswith("_loss"):
                    model, window, _ = key.split("_")
                    self.metrics.gate_loss.labels(model, window).set(value)
        record.update(verdict=verdict, passed=result.passed, reason=result.reason, metrics=result.metrics,
                      config=self.cfg.gate.model_dump())
        if result.passed:
            self._promote(candidate, record)
        self.audit.append(record)
        self.metrics.gate_decisions.labels(verdict).inc()
        self.last_gate = {"verdict": verdict, "step": self.step, "reason": result.reason}
        self.progress.event("gate", verdict=verdict, step=self.step, reason=result.reason)

    def _loss_of(self, ref: CheckpointRef, tokens: np.ndarray, lengths: np.ndarray) -> float:
        return ray.get(self.learner.evaluate.remote(tokens, lengths, ref))

    def _promoted_record(self, version: int, ref: CheckpointRef) -> dict[str, Any]:
        return {"version": version, **ref.to_dict(), "promoted_unix": time.time()}

    def _promote(self, candidate: CheckpointRef, record: dict[str, Any]) -> None:
        promoted = self._promoted_record(int(self.served["version"]) + 1, candidate)
        swap_s = self.server.swap(promoted)
        self.served = promoted
        self._write_served()
        self._publish_served()
        self.metrics.promotions.inc()
        self.metrics.swap_seconds.observe(swap_s)
        record.update(promoted_version=promoted["version"], swap_seconds=round(swap_s, 4))

    def _publish_served(self) -> None:
        self.metrics.served_version.set(self.served["version"])
        self.metrics.served_step.set(self.served["step"])

    def _write_served(self) -> None:
        tmp = f"{self.store.root}/.{SERVED}.tmp"
        self.store.fs.pipe_file(tmp, json.dumps(self.served).encode())
        self.store.fs.mv(tmp, f"{self.store.root}/{SERVED}")

    def _read_served(self) -> dict[str, Any] | None:
        try:
            served = json.loads(self.store.fs.cat_file(f"{self.store.root}/{SERVED}"))
            self.store.verify(CheckpointRef.from_dict(served))
            return served
        except (FileNotFoundError, ValueError, KeyError):
            return None
        except CheckpointError as e:  # a damaged served checkpoint: fall back to the checkpoint's record
            self.progress.event("warning", message=f"served version in {SERVED} does not verify ({e}); using the checkpoint's")
            return None


def buffer_digest(buffer) -> str:
    """sha256 over a buffer's kept sequences, counters and random state: equal digests, equal buffers."""
    h = hashlib.sha256()
    state = buffer.state_dict()
    for k in sorted(state["arrays"]):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state["arrays"][k]).tobytes())
    meta = {k: v for k, v in state["meta"].items() if k != "rng"}
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(json.dumps(state["meta"]["rng"], sort_keys=True).encode())
    return h.hexdigest()
