"""The supervisor: wires the stages, runs the step loop, checkpoints the run, restarts what fails.

    ingest (thread)  source -> decode -> dead letter -> holdout -> tokenize -> pack   (daemon/ingest.py)
    train            learner actor + replay mixer                                      (learners/trainer.py)
    judge            evaluator actor + gates, off the training path                    (deploy/judge.py)
    promote          served record, swap, revert, audit                                (deploy/promote.py)

Each step: take packed windows, train, and at the configured intervals write
one run checkpoint from the stages' states (daemon/runstate.py) and submit it
to the judge; verdicts are collected between steps. A stage that cannot go on
(its actor died, a streak of non-finite steps) makes the supervisor restore
every stage from the newest verified checkpoint, after a pause that grows
while failures repeat. Details of each stage live in its module.
"""

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from everlearn.buffers.persist import buffer_digest
from everlearn.daemon.admin import AdminQueue, admin_endpoint
from everlearn.daemon.branching import BranchStage
from everlearn.daemon.config import Config
from everlearn.daemon.deadletter import DeadLetterSink
from everlearn.daemon.demo import seed_if_empty
from everlearn.daemon.http import StatusServer
from everlearn.daemon.ingest import IngestStage
from everlearn.daemon.lease import RunLease
from everlearn.daemon.metrics import Metrics
from everlearn.daemon.monitors import Monitors
from everlearn.daemon.operator import Operator, read_paused
from everlearn.daemon.progress import Progress
from everlearn.daemon.runstate import RunState
from everlearn.daemon.runtime import LoopWatch, StopSignals, start_ray, stop_ray
from everlearn.daemon.status import JsonlLog, Quarantine, Rate, compose_status
from everlearn.deploy import AuditLog
from everlearn.deploy.judge import JudgeStage
from everlearn.deploy.promote import PromoteStage
from everlearn.errors import (
    CheckpointError,
    ConfigError,
    EverlearnError,
    NonFiniteError,
    StageFailed,
)
from everlearn.learners import CheckpointRef, CheckpointStore, build_tokenizer
from everlearn.learners.trainer import TrainStage
from everlearn.retry import Backoff, retry


class Daemon:
    """Runs one everlearn run until stopped or ``max_steps`` steps. Boundaries are parameters."""

    def __init__(self, cfg: Config, registry=None, out=None, clock=time.monotonic, stop: threading.Event | None = None):
        self.cfg, self.clock = cfg, clock
        self.loop_watch = LoopWatch(cfg.supervision.liveness_timeout_s, clock)  # /livez
        self.stop_event = stop or threading.Event()
        self.metrics = Metrics(registry)
        self.progress = Progress(out, interval_s=cfg.log.interval_s)
        ev = self.progress.event
        self.run_dir = Path(cfg.run_dir)
        self.store = CheckpointStore(cfg.checkpoint_url, cfg.checkpoint.storage_options, timeout_s=cfg.checkpoint.io_timeout_s)
        self.lease = RunLease(self.run_dir, self.store, cfg.supervision.lease_ttl_s)
        self.runstate = RunState(self.store, cfg.buffer.shard_mb, self.metrics, ev)
        self.lineage = JsonlLog(self.run_dir / "lineage.jsonl") if cfg.log.lineage else None
        tokenizer = build_tokenizer(cfg.model)
        self.ingest = IngestStage(cfg, tokenizer, self.metrics, ev, DeadLetterSink(self.run_dir / "dead_letter.jsonl"))
        self.quarantine = Quarantine(self.run_dir / "quarantine.jsonl", self.ingest.quarantined)
        self.train = TrainStage(cfg.model, cfg.train, cfg.schedule, cfg.buffer, self.store, self.metrics, ev, self.quarantine,
                                self.lineage.append if self.lineage else None, cfg.supervision.nonfinite_rollback_after)
        self.judge = JudgeStage(cfg.gate, cfg.model, cfg.checkpoint.storage_options, self.metrics, ev, cfg.train.eval_batch_size)
        self.promote = PromoteStage(self.store, cfg.model, cfg.serve, AuditLog(self.run_dir / "audit.jsonl"), self.metrics, ev)
        self.status_server: StatusServer | None = None
        self.state, self.step = "starting", 0
        self.counters = {"tokens_trained": 0}
        self.restarts: dict[str, int] = {}
        self.last_checkpoint: CheckpointRef | None = None
        self.resumed_from: CheckpointRef | None = None
        self.checkpoint_failing: str | None = None
        self._restart_backoff = Backoff(cfg.supervision.restart_backoff_s, cfg.supervision.backoff_max_s)
        self.rate = Rate(clock)
        self.admin = AdminQueue(cfg.admin.action_timeout_s)
        self.monitors = Monitors(self)
        self.branch = BranchStage(self)  # gate.candidate: anneal_branch (its state rides in every run checkpoint: runstate.attach)
        self.paused: dict[str, Any] | None = read_paused(self.run_dir)
        self.metrics.paused.set(1 if self.paused else 0)
        self._ray_owned = False

    def status(self) -> dict[str, Any]:
        return compose_status(self)

    def health(self) -> list[str]:
        return [p for p in (self.ingest.degraded, self.checkpoint_failing, self.lease.lost) if p]

    # -- lifecycle -----------------------------------------------------------
    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        """Run until stopped or ``max_steps`` more steps; returns the final status."""
        self.lease.acquire()
        try:
            seed_if_empty(self.cfg.source.url, self.cfg.demo, self.progress.event)
            signals = StopSignals(self.stop_event, self.cfg.supervision.stop_grace_s, self.progress.event)
            signals.install()  # a stop while waiting for a cluster that is not up yet ends the wait
            self._ray_owned = start_ray(self.cfg, signals)
            self._open()
            self._loop(max_steps)
            self._stop()
        finally:
            self._close()
        return self.status()

    def _open(self) -> None:
        cfg = self.cfg
        try:
            admin = admin_endpoint(cfg.admin, self.run_dir, self.admin, lambda action, code: self.metrics.admin_calls.labels(action, str(code)).inc())
            self.status_server = StatusServer(cfg.metrics.host, cfg.metrics.port, self.metrics.registry, self.status, self.health,
                                             self.loop_watch.problems, admin).start()
        except OSError as e:
            raise ConfigError(f"cannot listen on metrics.host:metrics.port = {cfg.metrics.host}:{cfg.metrics.port} ({e}); "
                              "is another daemon running? Set metrics.port to a free port (0 picks one)") from e
        self.train.start()  # the learner actor starts (imports, builds the model) while the rest goes on
        ref, set_aside = retry(self.store.recover, timeout_s=cfg.supervision.checkpoint_retry_s)
        self.runstate.report(set_aside)
        serving_known = ref is not None and self.promote.open()
        if serving_known:  # replicas start while the run restores
            self.promote.start_serving()
        daemon = self._restore(ref) if ref is not None else None
        if ref is None:
            ref = self._checkpoint(force=True)  # step 0: the version serving starts on
        if not serving_known:
            self.promote.open(ref if daemon is None else None, fallback=(daemon or {}).get("served"))
            self.promote.start_serving()
        self.metrics.buffer_capacity.set(self.train.buffer.capacity)
        self.metrics.buffer_capacity_tokens.set(self.train.buffer.capacity * self.train.buffer.seq_len)
        self.ingest.start()
        self.promote.wait_serving()  # the evaluator actor starts with the first judgement (judge.py)
        self.monitors.resume()
        self.state = "running"
        self.progress.event("ready", step=self.step, serving=self.promote.server.url if self.promote.server else None,
                            served_version=self.promote.served["version"], metrics=self.status_server.url + "/metrics", stream=cfg.source.url)

    def _restore(self, ref: CheckpointRef) -> dict[str, Any]:
        try:
            daemon = self.runstate.read(ref, self.train, self.ingest, self.judge)
        except (ValueError, KeyError) as e:  # shapes or fields that do not fit this config
            raise ConfigError(f"cannot resume from {ref.uri}: {e}. The run in {self.cfg.run_dir} was made with another model, "
                              "train.seq_len or buffer/holdout capacity; use the config it was made with, or a new run_dir") from e
        self.step = self.train.step
        self.counters.update({k: v for k, v in daemon.get("counters", {}).items() if k in self.counters})
        self.last_checkpoint = self.resumed_from = ref
        if self.lineage is not None:  # steps after this one, if any, were lost with the process that took them
            self.lineage.append({"resumed_from_step": self.step})
        self.progress.event("resumed", step=self.step, checkpoint=ref.uri, buffer=len(self.train.buffer),
                            buffer_sha256=buffer_digest(self.train.buffer), served_version=daemon.get("served", {}).get("version"))
        return daemon

    def _stop(self) -> None:
        """Collect a verdict still pending, then the final checkpoint (within the stop grace period)."""
        self.state = "stopping"
        deadline = self.clock() + self.cfg.supervision.stop_grace_s / 2
        while self.judge.pending is not None and self.clock() < deadline:
            self._collect(timeout=0.5)
        self._checkpoint(retry_s=max(1.0, deadline + self.cfg.supervision.stop_grace_s / 2 - self.clock()), required=True)

    def _close(self) -> None:
        self.admin.fail_pending("the daemon is stopping; the action was not carried out")
        self.progress.close()
        self.ingest.close()
        for stage in (self.branch, self.judge, self.train):
            with contextlib.suppress(Exception):
                stage.stop()
        # Serving is left running on a cluster the daemon joined: it keeps answering with the promoted
        # version while the daemon restarts or upgrades. A local Ray takes Serve down with it.
        if self.status_server is not None:
            self.status_server.stop()
        if self._ray_owned:
            stop_ray()
        self.lease.release()
        self.state = "stopped"

    # -- the loop ------------------------------------------------------------
    def _loop(self, max_steps: int | None) -> None:
        taken = 0
        while not self.stop_event.is_set() and (max_steps is None or taken < max_steps):
            self.loop_watch.tick()
            if self.lease.lost:
                raise EverlearnError(f"{self.lease.lost}; stopping so that two daemons never write one run")
            self.admin.run_pending(Operator(self))
            self._collect()
            self.monitors.tick()
            if self.paused is not None:
                self.state = f"paused: {self.paused.get('reason')}"
                self.progress.update(self.status())
                self.stop_event.wait(0.1)
                continue
            t0 = self.clock()
            windows = self.ingest.take(self.train.n_fresh(), timeout=min(self.cfg.source.poll_interval_s, 0.5))
            self.metrics.train_wait_seconds.inc(self.clock() - t0)
            if windows is None:
                self.state = "idle: waiting for documents"
                if self.monitors.quiet(self.clock()):
                    self._submit()
                self.progress.update(self.status())
                continue
            self.monitors.flowing()
            try:
                stats = self.train.train(windows)
            except StageFailed as e:
                self._recover(e)
                continue
            if stats.skipped:
                continue
            self.branch.observe(windows.tokens)  # the newest fresh windows feed an anneal branch
            self.state, self.step, taken = "training", stats.step, taken + 1
            self._observe(stats)
            self.monitors.after_step()
            if self.step % self.cfg.gate.every_steps == 0 or self.monitors.judge_now:
                self.monitors.judge_now = False
                self._submit()
            elif self.step % self.cfg.checkpoint.every_steps == 0:
                self._checkpoint()
            self.progress.update(self.status())

    def _observe(self, stats) -> None:
        self.counters["tokens_trained"] += stats.tokens
        self.rate.add(stats.tokens)
        self._restart_backoff.reset()

    def _recover(self, failure: StageFailed) -> None:
        """Restore every stage from the newest verified checkpoint (new actors where they died)."""
        stage = failure.stage
        self.restarts[stage] = self.restarts.get(stage, 0) + 1
        if failure.actor_died:
            self.metrics.stage_restarts.labels(stage).inc()
        self.metrics.rollbacks.labels(stage).inc()
        delay = self._restart_backoff.next_delay()
        self.progress.event("stage_restart", stage=stage, reason=failure.reason, restarts=self.restarts[stage], in_s=round(delay, 2))
        self.state = f"recovering: {failure.reason}"
        self.stop_event.wait(delay)
        self.ingest.stop()
        if failure.actor_died:
            self.train.restart()  # a new learner; after a NaN streak the live one just reloads the checkpoint
        ref, set_aside = retry(self.store.recover, timeout_s=self.cfg.supervision.checkpoint_retry_s)
        self.runstate.report(set_aside)
        if ref is None:
            raise CheckpointError(f"no checkpoint in {self.store.url} verifies; cannot recover the {stage} stage")
        self._restore(ref)
        self.ingest.start()

    # -- checkpoints, judgements, promotions ------------------------------------
    def _checkpoint(self, force: bool = False, retry_s: float | None = None, required: bool = False) -> CheckpointRef | None:
        """Commit a checkpoint of the whole run at the current step; None when storage stayed down."""
        if not force and self.last_checkpoint is not None and self.last_checkpoint.step == self.step:
            return self.last_checkpoint
        protect = self.promote.protect(self.cfg.checkpoint.keep_promoted) | self.judge.protect()  # judge: the anchor, the candidate
        daemon = {"counters": self.counters, "served": self.promote.served, "judge": self.judge.state_dict()}
        sv = self.cfg.supervision
        try:
            ref = self.runstate.commit(self.step, self.train, self.ingest, daemon, {"served_version": self.promote.served.get("version")},
                                       protect, self.cfg.checkpoint.keep_last, retry_s or sv.checkpoint_retry_s,
                                       Backoff(sv.backoff_base_s, sv.backoff_max_s))
        except NonFiniteError as e:
            raise StageFailed("train", str(e)) from e
        except (EverlearnError, OSError) as e:
            self.metrics.checkpoint_failures.inc()
            self.checkpoint_failing = f"checkpoint at step {self.step} failed: {type(e).__name__}: {str(e)[:300]}"
            self.progress.event("checkpoint_failed", step=self.step, error=self.checkpoint_failing)
            if required or self.last_checkpoint is None:
                raise
            return None
        self.checkpoint_failing = None
        self.last_checkpoint = ref
        self.ingest.durable()
        return ref

    def _submit(self) -> None:
        if self.judge.pending is not None:  # judgements never pile up: wait for the one in flight
            while self.judge.pending is not None and not self.stop_event.is_set():
                self._collect(timeout=0.5)
        judged = self.branch.plan(self.step)  # trunk | branch | busy (a branch still runs; the trunk never waits for it)
        candidate = self._checkpoint()
        if candidate is None or judged == "busy" or (judged == "branch" and self.branch.start(candidate)):
            return  # a branch's candidate is judged when the branch is done (_collect)
        evidence = self.ingest.evidence(self.cfg.gate.max_eval_sequences)
        self.monitors.judged(self.step, self.promote.served, evidence)
        verdict = self.judge.submit(self.step, candidate, dict(self.promote.served), evidence)
        if verdict is not None:
            self._decide(verdict)

    def _collect(self, timeout: float = 0.0) -> None:
        for poll in (lambda: self.judge.poll(timeout), self.branch.poll):  # the judge first: a finished branch may need it free
            if (verdict := poll()) is not None:
                self._decide(verdict)

    def _decide(self, j) -> None:
        record = j.audit_record(self.cfg.gate)
        if j.verdict == "promoted":
            record = self.promote.promote(j, record)
            if record.get("verdict") == "promoted" and not record.get("reverted"):  # it serves: the anchor policy counts it
                self.judge.promoted(self.promote.served)
            self.monitors.after_promotion(record)
        else:
            self.promote.audit.append(record)
        self.monitors.after_verdict(j)
        self.progress.event("gate", verdict=j.verdict, step=j.step, reason=j.result.reason)
