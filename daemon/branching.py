"""The supervisor's side of anneal branches (``gate.candidate: anneal_branch``; the job itself: learners/branch.py).

At a judgement of step S (``Daemon._submit``), ``plan`` says what is judged:

    trunk    gate.candidate is trunk; or S is still in warmup/cooldown, where an anneal may not start
             (event ``branch_skipped``): the trunk's checkpoint, as before
    branch   the trunk's checkpoint S is committed with the branch marked pending in its daemon state;
             ``start`` hands it to the branch actor, which anneals a copy for schedule.anneal_steps steps
             beside the trunk (event ``branch_started``)
    busy     a branch is still running: this interval is not judged (event ``branch_busy``); the trunk
             never waits for a branch

Between steps ``poll`` collects the branch like the judge's verdicts: its
candidate (in ``<checkpoints>/branches``) goes to the judge (event
``branch_done``); an actor that died, raised or overran ``gate.timeout_s`` is a
``failed`` verdict, and the trunk goes on. The branches store is swept after
each branch: the served and the promoted versions ``checkpoint.keep_promoted``
keeps, the judge's (anchor, candidate), the new candidate and the newest
``checkpoint.keep_last`` stay.

The branch actor reserves no CPU (like the evaluator: it shares the cores,
with train.torch_threads threads) and train.num_gpus GPUs (on a node with one
GPU, give the learner and the branch half of it each: train.num_gpus 0.5). It
keeps its model between branches and is started by the first one.

State (``RunState`` writes it into every run checkpoint, ``attach``): the
pending branch in daemon.json (the trunk's checkpoint, protected from the sweep
until the branch is judged) and ``branch.safetensors`` (the fresh ring and the
anneal's batches). A restart runs a pending branch again from its trunk
checkpoint; the job is a function of that checkpoint, so the candidate is the
same, byte for byte.
"""

import contextlib
import time
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from everlearn.deploy.gates import GateResult
from everlearn.deploy.judge import Judgement
from everlearn.errors import StorageUnavailable
from everlearn.learners import CheckpointRef, CheckpointStore
from everlearn.learners.branch import (
    BRANCH_DATA,
    BRANCHES,
    BranchJob,
    FreshRing,
    anneal_batches,
    branches_url,
    can_anneal,
    decode_data,
    encode_data,
)
from everlearn.learners.checkpoints import step_name


class BranchStage:
    key = "branch"  # its state in daemon.json

    def __init__(self, daemon):
        self.d, cfg = daemon, daemon.cfg
        self.cfg, self.enabled = cfg, cfg.gate.candidate == "anneal_branch"
        self.branches = CheckpointStore(branches_url(cfg.checkpoint_url), cfg.checkpoint.storage_options, timeout_s=cfg.checkpoint.io_timeout_s)
        self.ring = FreshRing(cfg.schedule.anneal_steps * cfg.train.batch_size, cfg.train.seq_len) if self.enabled else None
        self.actor = None
        self.pending: dict[str, Any] | None = None  # the branch in flight: step, name and manifest sha256 of its trunk checkpoint
        self._planned: int | None = None  # the step whose checkpoint is about to be branched
        self._busy: int | None = None  # the last step a judgement found a branch running
        self._job: tuple[Any, float] | None = None  # (the actor's answer, when it was asked)
        self._ready: CheckpointRef | None = None  # a candidate waiting for the judge to be free
        self.last: dict[str, Any] | None = None
        daemon.runstate.attach(self)

    # -- the trunk's side ----------------------------------------------------------
    def observe(self, fresh: np.ndarray) -> None:
        """The fresh windows of a step the trunk took (the newest feed the anneal)."""
        if self.enabled:
            self.ring.add(fresh)

    def plan(self, step: int) -> str:
        """What the judgement at ``step`` judges: ``trunk``, ``branch`` or nothing (``busy``); see the module docstring."""
        self._planned = None
        if not self.enabled:
            return "trunk"
        if self.pending is not None:
            if step not in (self._busy, self.pending["step"]):  # once per step: a quiet stream asks again every turn of the loop
                self.d.progress.event("branch_busy", step=step, branching=self.pending["step"])
            self._busy = step
            self.d.monitors.flowing()  # a quiet stream's judgement waits another gate.idle_judge_s, not one turn
            return "busy"
        s = self.cfg.schedule
        why = None if can_anneal(step, s) else f"step {step} is in warmup/cooldown (< {s.warmup_steps + s.cooldown_steps})"
        if why is None and not len(self.ring) and not len(self.d.train.buffer):
            why = "no fresh windows and an empty replay buffer"
        if why is not None:
            self.d.metrics.branches.labels("skipped").inc()
            self.d.progress.event("branch_skipped", step=step, reason=f"{why}: an anneal may not start; the trunk is judged")
            return "trunk"
        self._planned = step
        return "branch"

    def start(self, trunk: CheckpointRef | None) -> bool:
        """Branch the committed checkpoint ``trunk`` (planned by ``plan``); False when no branch started."""
        planned, self._planned = self._planned, None
        if trunk is None or planned != trunk.step:
            return False
        try:
            written = BRANCH_DATA in self.d.store.manifest(trunk)["files"]
        except StorageUnavailable:
            written = True  # the actor reads it again, and a failure there is a verdict
        if not written:  # a checkpoint of this step written before gate.candidate was anneal_branch
            self.d.metrics.branches.labels("skipped").inc()
            self.d.progress.event("branch_skipped", step=trunk.step, reason=f"{trunk.name} holds no {BRANCH_DATA}; the trunk is judged")
            return False
        self.pending = {"step": trunk.step, "name": trunk.name, "manifest_sha256": trunk.manifest_sha256}
        self._launch(resumed=False)
        return True

    def _launch(self, resumed: bool) -> None:
        if self.actor is None:
            c = self.cfg
            actor = ray.remote(BranchJob).options(num_cpus=0, num_gpus=c.train.num_gpus, resources=c.train.resources, max_restarts=0)
            self.actor = actor.remote(c.model, c.train, c.schedule, self.d.store.url, self.branches.url, c.checkpoint.storage_options,
                                      c.checkpoint.io_timeout_s)
        p = self.pending
        self._job = (self.actor.run.remote(p["name"], p["manifest_sha256"], sorted(self._protected())), time.monotonic())
        self.d.progress.event("branch_started", step=p["step"], trunk=p["name"], anneal_steps=self.cfg.schedule.anneal_steps, resumed=resumed)

    def _protected(self) -> set[str]:
        """Checkpoints the branches store keeps: served and promoted versions, the judge's, and the candidate waiting."""
        d = self.d
        return d.promote.protect(self.cfg.checkpoint.keep_promoted) | d.judge.protect() | ({self._ready.name} if self._ready else set())

    # -- between steps ------------------------------------------------------------
    def poll(self) -> Judgement | None:
        """Collect a finished branch: its candidate goes to the judge (a skipped verdict comes back at once); a failure is a verdict."""
        if self._job is not None:
            ref, t0 = self._job
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                if time.monotonic() - t0 <= self.cfg.gate.timeout_s:
                    return None
                self.stop()
                return self._failed(f"the branch took longer than gate.timeout_s={self.cfg.gate.timeout_s}")
            self._job = None
            try:
                result = ray.get(ref)
            except RayActorError as e:
                self.actor = None
                return self._failed(f"the branch actor died ({type(e).__name__})")
            except Exception as e:  # noqa: BLE001 a trunk checkpoint that does not verify, non-finite steps: a verdict, never a crash
                cause = getattr(e, "cause", None) or e
                return self._failed(f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}")
            self._done(result, time.monotonic() - t0)
        if self._ready is None or self.d.judge.pending is not None:
            return None
        return self._judge()

    def _done(self, result: dict[str, Any], seconds: float) -> None:
        d, m = self.d, self.d.metrics
        self._ready = CheckpointRef.from_dict(result["candidate"])
        m.branch_steps.inc(result["steps"])
        m.branch_seconds.observe(seconds)
        m.branches.labels("reused" if result["reused"] else "done").inc()
        for name, where, reason in result.get("set_aside", []):
            m.checkpoints_set_aside.inc()
            d.progress.event("checkpoint_set_aside", checkpoint=f"{BRANCHES}/{name}", moved_to=where, reason=reason[:500])
        lrs, losses = result.get("lrs") or [None], result.get("losses") or [None]
        self.last = {"step": self.pending["step"], "candidate": self._ready.uri, "steps": result["steps"], "seconds": round(seconds, 3),
                     "reused": result["reused"], "fresh_rows": result.get("fresh_rows"), "replay_rows": result.get("replay_rows"),
                     "lr_first": lrs[0], "lr_last": lrs[-1], "loss_first": losses[0], "loss_last": losses[-1]}
        d.progress.event("branch_done", **self.last)
        try:
            d.runstate.report(self.branches.sweep(self.cfg.checkpoint.keep_last, protect=self._protected()))
        except Exception as e:  # noqa: BLE001 retention is retried after the next branch
            d.progress.event("warning", message=f"sweeping {self.branches.url} failed: {type(e).__name__}: {str(e)[:200]}")

    def _judge(self) -> Judgement | None:
        d, candidate, step = self.d, self._ready, self.pending["step"]
        self._ready = self.pending = None
        evidence = d.ingest.evidence(self.cfg.gate.max_eval_sequences)
        d.monitors.judged(step, d.promote.served, evidence)
        return d.judge.submit(step, candidate, dict(d.promote.served), evidence)

    def _failed(self, reason: str) -> Judgement:
        p, d = self.pending, self.d
        self.pending = self._ready = None
        trunk = CheckpointRef(uri=d.store.uri(p["name"]), name=p["name"], step=p["step"], manifest_sha256=p.get("manifest_sha256") or "")
        j = Judgement(p["step"], trunk, dict(d.promote.served), "failed", GateResult(False, f"failed: {reason}"))
        d.metrics.branches.labels("failed").inc()
        d.metrics.gate_decisions.labels("failed").inc()
        d.judge.last = {"verdict": j.verdict, "step": j.step, "reason": j.result.reason}
        d.progress.event("branch_failed", step=p["step"], trunk=p["name"], reason=reason)
        return j

    def stop(self) -> None:
        if self.actor is not None:
            with contextlib.suppress(Exception):  # already dead is fine
                ray.kill(self.actor, no_restart=True)
        self.actor, self._job = None, None

    # -- state: every run checkpoint (daemon/runstate.py) ----------------------------
    def protect(self) -> set[str]:
        """The trunk checkpoint of the pending branch: the run's store keeps it until the branch is judged."""
        return {self.pending["name"]} if self.pending else set()

    def files(self, step: int) -> dict[str, bytes]:
        """``branch.safetensors`` for the checkpoint of ``step``: the fresh ring, and the anneal's batches from the constant phase on."""
        if not self.enabled:
            return {}
        train, n = self.d.train, self.cfg.schedule.anneal_steps
        batches = None
        if can_anneal(step, self.cfg.schedule):
            fresh = [train.mixer.n_fresh(step + i) for i in range(n)]
            batches = anneal_batches(self.ring.rows(), train.buffer, fresh, self.cfg.train.batch_size, (self.cfg.buffer.seed, step))
        return {BRANCH_DATA: encode_data(step, self.cfg.train.batch_size, self.ring.rows(), batches)}

    def state_dict(self, step: int) -> dict[str, Any]:
        pending = self.pending or ({"step": step, "name": step_name(step), "manifest_sha256": None} if self._planned == step else None)
        return {"pending": pending, "last": self.last}

    def load(self, state: dict[str, Any] | None, read) -> None:
        """Restore from a run checkpoint (``read(name)``: one of its files, None when absent); a pending branch runs again."""
        data = read(BRANCH_DATA)
        if self.enabled:
            self.ring.load(decode_data(data)["ring"] if data is not None else None)
        state = state or {}
        pending = state.get("pending")
        same = pending is not None and self.pending is not None and pending["name"] == self.pending["name"]
        if self._job is not None and not same:
            self.stop()
        self.pending, self._ready, self._planned = pending, self._ready if same else None, None
        self.last = state.get("last", self.last)
        if pending is not None and not self.enabled:
            self.d.progress.event("branch_dropped", step=pending["step"], reason="gate.candidate is trunk now; the next judgement judges the trunk")
            self.pending = None
        elif pending is not None and self._job is None and self._ready is None:
            self._launch(resumed=True)

    def status(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        running = None
        if self.pending is not None:
            running = {"from_step": self.pending["step"], "trunk": self.pending["name"], "anneal_steps": self.cfg.schedule.anneal_steps,
                       "running_s": round(time.monotonic() - self._job[1], 1) if self._job else None, "waiting_for_judge": self._ready is not None}
        return {"running": running, "last": self.last, "store": self.branches.url}

