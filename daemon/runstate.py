"""One run checkpoint composed from the stages' states, and the way back from it.

    step-N/model.safetensors, optimizer.pt, learner.json   the learner actor's files (train)
    step-N/buffer-*.safetensors, buffer.json, train.json   replay buffer and schedule (train)
    step-N/ingest.safetensors, ingest.json                 pending tokens and the fresh held-out window
                                                           as arrays; source position, counters (ingest)
    step-N/holdout_old-*.safetensors, holdout_old.json     the old held-out reservoir (ingest)
    step-N/branch.safetensors                              anneal branches (gate.candidate: anneal_branch): the
                                                           fresh ring and the anneal's batches (daemon/branching.py)
    step-N/daemon.json                                     the run: step, counters, served record, judge, branch
    step-N/manifest.json                                   every file's sha256; created last

Parts beside the stages (``attach``: the anneal branches) add files, a key of
daemon.json and checkpoints to protect from the sweep.

A failpoint sits between every two writes (``checkpoint.*``), so the
reliability suite can crash the process at each of them.
"""

import json
import time
from collections.abc import Callable
from typing import Any

import safetensors.numpy

from everlearn import failpoints
from everlearn.buffers.persist import from_files, to_files
from everlearn.daemon.ingest import IngestStage
from everlearn.deploy.judge import JudgeStage
from everlearn.learners import CheckpointRef, CheckpointStore
from everlearn.learners.checkpoints import SetAside
from everlearn.learners.trainer import TrainStage
from everlearn.retry import Backoff, retry

DAEMON_STATE = "daemon.json"
INGEST_ARRAYS, INGEST_META, HOLDOUT_OLD = "ingest.safetensors", "ingest.json", "holdout_old"
FORMAT = 2  # 1: pending tokens and the fresh window as JSON lists inside daemon.json


class RunState:
    def __init__(self, store: CheckpointStore, shard_mb: int, metrics, events: Callable[..., None]):
        self.store, self.shard_bytes, self.metrics, self.events = store, shard_mb << 20, metrics, events
        self.parts: list = []  # each: key, files(step), state_dict(step), protect(), load(state, read)

    def attach(self, part) -> None:
        """A part of the run with files, state (daemon.json[part.key]) and protected checkpoints of its own."""
        self.parts.append(part)

    def report(self, set_aside: SetAside) -> None:
        for name, where, reason in set_aside.moved:
            self.metrics.checkpoints_set_aside.inc()
            self.events("checkpoint_set_aside", checkpoint=name, moved_to=where, reason=reason[:500])
        for name in set_aside.removed:
            if name.startswith("set-aside/"):
                self.events("set_aside_deleted", path=name, reason="more than checkpoint.keep_set_aside kept")

    def write(self, step: int, train: TrainStage, ingest: IngestStage, daemon: dict[str, Any],
              meta: dict[str, Any], protect: set[str], keep_last: int) -> CheckpointRef:
        """Write every stage's files for ``step``, then the manifest; sweep old ones (never ``protect``)."""
        self.report(self.store.begin(step))
        failpoints.hit("checkpoint.begin")
        files = train.save(step)
        failpoints.hit("checkpoint.train_saved")
        state = ingest.state_dict()
        files[INGEST_ARRAYS] = self.store.put(step, INGEST_ARRAYS, safetensors.numpy.save(state["arrays"]))
        files[INGEST_META] = self.store.put(step, INGEST_META, json.dumps(state["meta"]).encode())
        for name, data in to_files(HOLDOUT_OLD, state["holdout_old"], self.shard_bytes).items():
            files[name] = self.store.put(step, name, data)
        failpoints.hit("checkpoint.ingest_saved")
        for part in self.parts:
            for name, data in part.files(step).items():
                files[name] = self.store.put(step, name, data)
            daemon = {**daemon, part.key: part.state_dict(step)}
            protect = protect | part.protect()
        files[DAEMON_STATE] = self.store.put(step, DAEMON_STATE, json.dumps({**daemon, "step": step, "format": FORMAT}, default=str).encode())
        failpoints.hit("checkpoint.before_manifest")
        ref = self.store.commit(step, files, meta=meta)
        failpoints.hit("checkpoint.committed")
        self.report(self.store.sweep(keep_last, protect=protect | {ref.name}))
        failpoints.hit("checkpoint.swept")
        return ref

    def commit(self, step: int, train: TrainStage, ingest: IngestStage, daemon: dict[str, Any], meta: dict[str, Any],
               protect: set[str], keep_last: int, retry_s: float, backoff: Backoff) -> CheckpointRef:
        """``write``, retried while storage does not answer for up to ``retry_s``; counted and timed."""
        t0 = time.perf_counter()
        ref = retry(lambda: self.write(step, train, ingest, daemon, meta, protect, keep_last), timeout_s=retry_s, backoff=backoff)
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_seconds.observe(time.perf_counter() - t0)
        return ref

    def read(self, ref: CheckpointRef, train: TrainStage, ingest: IngestStage, judge: JudgeStage) -> dict[str, Any]:
        """Restore the stages from a verified checkpoint; returns the run's own state (daemon.json)."""
        daemon = json.loads(self.store.read(ref, DAEMON_STATE))
        train.load(ref, legacy=daemon)
        old = from_files(HOLDOUT_OLD, lambda name: self.store.read(ref, name))
        if INGEST_META in self.store.manifest(ref)["files"]:
            state = {"arrays": safetensors.numpy.load(self.store.read(ref, INGEST_ARRAYS)),
                     "meta": json.loads(self.store.read(ref, INGEST_META)), "holdout_old": old}
        else:  # format 1: everything in daemon.json
            state = {"legacy": daemon, "holdout_old": old}
        ingest.load_state_dict(state)
        judge.load_state_dict(daemon.get("judge", {}))
        names = self.store.manifest(ref)["files"]
        for part in self.parts:
            part.load(daemon.get(part.key), lambda name: self.store.read(ref, name) if name in names else None)
        return daemon
