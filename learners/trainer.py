"""The train stage: the learner actor, the replay buffer and the mixer that feeds one from the other.

Each step: mix the fresh windows with replayed ones, train on the learner
actor, then let the fresh windows into the reservoir. A step the learner
skipped (non-finite loss or gradient) leaves weights and buffer untouched; its
documents are quarantined with their provenance, and a streak of them asks the
supervisor for a rollback. A learner actor that dies asks for a restart. In
both cases the supervisor restores the whole run from its newest verified
checkpoint, so every stage agrees on the step again.

State: the learner's own files (weights, optimizer, step; written by the
actor), the buffer as safetensors shards, the replay schedule as JSON.
"""

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from everlearn import failpoints
from everlearn.buffers import BufferConfig, build_buffer
from everlearn.buffers.persist import from_files, to_files
from everlearn.errors import StageFailed
from everlearn.learners.batching import ReplayMixer, Windows
from everlearn.learners.checkpoints import CheckpointRef, CheckpointStore, FileEntry
from everlearn.learners.config import TrainConfig
from everlearn.learners.learner import Learner, StepStats
from everlearn.learners.model import ModelConfig
from everlearn.learners.replay import ReplaySchedule
from everlearn.learners.schedules import ScheduleConfig

TRAIN_STATE = "train.json"
Record = Callable[[dict[str, Any]], None]


class TrainStage:
    def __init__(self, model: ModelConfig, train: TrainConfig, schedule: ScheduleConfig, buffer: BufferConfig,
                 store: CheckpointStore, metrics, events: Callable[..., None], quarantine: Record,
                 lineage: Record | None = None, rollback_after: int = 3):
        self.model_cfg, self.train_cfg, self.schedule_cfg, self.buffer_cfg = model, train, schedule, buffer
        self.store, self.metrics, self.events = store, metrics, events
        self.quarantine, self.lineage, self.rollback_after = quarantine, lineage, rollback_after
        self.buffer = build_buffer(buffer, train.seq_len)
        replay = ReplaySchedule(buffer.replay_fraction, buffer.replay_boost, buffer.boost_steps, buffer.shift_window, buffer.shift_threshold)
        self.mixer = ReplayMixer(self.buffer, replay, train.batch_size)
        self.lr_scale: tuple[float, int] | None = None  # (factor, until step): a drift response
        self.learner = None
        self.step = 0
        self.nonfinite_in_row = 0
        self.last: StepStats | None = None
        self.info: dict[str, Any] | None = None  # the learner's describe(), once it has loaded

    # -- the actor -----------------------------------------------------------
    def start(self) -> None:
        if self.train_cfg.num_workers > 1:  # data-parallel workers through Ray Train (learners/ddp.py), same calls
            from everlearn.learners.ddp import LearnerGroup

            env = {failpoints.ENV: os.environ[failpoints.ENV]} if os.environ.get(failpoints.ENV) else None
            self.learner = LearnerGroup(self.model_cfg, self.train_cfg, self.schedule_cfg, self.store.url, self.store.storage_options,
                                        self.store.timeout_s, env_vars=env).start()
            return
        options: dict[str, Any] = {"num_cpus": self.train_cfg.num_cpus, "num_gpus": self.train_cfg.num_gpus, "resources": self.train_cfg.resources,
                                   "max_restarts": 0}
        if os.environ.get(failpoints.ENV):  # tests: the learner's failpoints are the daemon's, on any cluster
            options["runtime_env"] = {"env_vars": {failpoints.ENV: os.environ[failpoints.ENV]}}
        actor = ray.remote(Learner).options(**options)
        self.learner = actor.remote(self.model_cfg, self.train_cfg, self.schedule_cfg, self.store.url, self.store.storage_options,
                                    self.store.timeout_s)

    def stop(self) -> None:
        if self.learner is not None:
            if isinstance(self.learner, ActorHandle):
                with contextlib.suppress(Exception):  # already dead is fine
                    ray.kill(self.learner, no_restart=True)
            else:  # a LearnerGroup: its Ray Train run, workers and mailbox
                self.learner.stop()
            self.learner = None

    def restart(self) -> None:
        self.info = None
        self.stop()
        self.start()

    def _call(self, method: str, *args):
        try:
            if not isinstance(self.learner, ActorHandle):  # a LearnerGroup raises StageFailed itself when a worker dies
                return getattr(self.learner, method)(*args)
            return ray.get(getattr(self.learner, method).remote(*args))
        except RayActorError as e:
            raise StageFailed("train", f"the learner actor died ({type(e).__name__}: {str(e).splitlines()[0][:300]})", actor_died=True) from e

    # -- a step --------------------------------------------------------------
    def n_fresh(self) -> int:
        return self.mixer.n_fresh(self.step)

    def train(self, windows: Windows) -> StepStats:
        """One step on ``windows`` plus replay; returns its stats (``skipped`` set when nothing was learned)."""
        trained = self.step
        tokens, lengths, n_replay = self.mixer.mix(windows.tokens)
        scale = self.lr_scale[0] if self.lr_scale and trained < self.lr_scale[1] else 1.0
        stats: StepStats = self._call("train_step", tokens, lengths, scale)
        self.last = stats
        if stats.skipped:
            self._quarantine(stats, windows, n_replay)
            return stats
        self.nonfinite_in_row = 0
        if self.mixer.remember(windows.tokens, windows.domains, trained, windows.weights):
            self.metrics.domain_mix_shifts.inc()
            self.events("domain_shift", step=stats.step, distance=round(self.mixer.schedule.detector.distance, 3),
                        replay_fraction=round(self.mixer.schedule(stats.step), 4))
        self.step = stats.step
        self._observe(stats, lengths, n_replay, len(tokens))
        if self.lineage is not None:
            spans = [[s.doc_id, s.start, s.end] for window in windows.lineage for s in window]
            self.lineage({"step": stats.step, "replayed": n_replay, "spans": spans})
        return stats

    def _quarantine(self, stats: StepStats, windows: Windows, n_replay: int) -> None:
        self.nonfinite_in_row += 1
        docs = [{"id": s.doc_id, "start": s.start, "end": s.end, "provenance": windows.provenance.get(s.doc_id, {})}
                for window in windows.lineage for s in window]
        self.quarantine({"step": self.step, "reason": stats.skipped, "loss": stats.loss, "grad_norm": stats.grad_norm,
                         "replayed_rows": n_replay, "documents": docs, "in_a_row": self.nonfinite_in_row})
        self.metrics.nonfinite_steps.inc()
        self.metrics.documents_quarantined.inc(len({d["id"] for d in docs}))
        self.events("nonfinite_step", step=self.step, reason=stats.skipped, documents=len(docs), in_a_row=self.nonfinite_in_row)
        if self.nonfinite_in_row >= self.rollback_after:
            self.nonfinite_in_row = 0
            raise StageFailed("train", f"{self.rollback_after} non-finite steps in a row ({stats.skipped}); rolling back")

    def _observe(self, stats: StepStats, lengths: np.ndarray, n_replay: int, n_rows: int) -> None:
        m = self.metrics
        m.train_steps.inc()
        m.step.set(stats.step)
        m.tokens_trained.inc(stats.tokens)
        m.tokens_replayed.inc(int(lengths[n_rows - n_replay :].sum()) if n_replay else 0)
        m.replay_fraction.set(n_replay / n_rows)
        m.loss.set(stats.loss)
        m.learning_rate.set(stats.lr)
        m.step_seconds.observe(stats.seconds)
        m.buffer_sequences.set(len(self.buffer))
        m.buffer_seen.set(self.buffer.seen)
        m.buffer_duplicates.set(self.buffer.duplicates)
        m.buffer_tokens.set(self.buffer.tokens_held)
        if stats.step % 10 == 0 or stats.step < 10:  # a bincount over the buffer: every few steps is plenty
            for domain, count in self.buffer.domain_counts().items():
                m.buffer_domain.labels(domain or "unknown").set(count)

    def status(self) -> dict[str, Any]:
        return {"size": len(self.buffer), "capacity": self.buffer.capacity, "seen": self.buffer.seen,
                "tokens": self.buffer.tokens_held, "replay_fraction": round(self.mixer.schedule(self.step), 4),
                "last_shift_step": self.mixer.schedule.shift_step}

    # -- state ---------------------------------------------------------------
    def scale_lr(self, scale: float, steps: int) -> None:
        """Multiply the learning rate by ``scale`` for the next ``steps`` steps (a drift response)."""
        self.lr_scale = (scale, self.step + steps) if scale != 1.0 else None

    def state_dict(self) -> dict[str, Any]:
        """Driver-side state: the buffer and the replay schedule (the learner's weights are the actor's files)."""
        return {"buffer": self.buffer.state_dict(), "replay": {**self.mixer.schedule.state_dict(), "lr_scale": self.lr_scale}, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.mixer.schedule.load_state_dict(state.get("replay", {}))
        scale = state.get("replay", {}).get("lr_scale")
        self.lr_scale = tuple(scale) if scale else None
        self.step = int(state["step"])
        self.nonfinite_in_row = 0

    def save(self, step: int) -> dict[str, FileEntry]:
        """Write this stage's files into the checkpoint for ``step``; returns their digests."""
        files = self._call("save", step)
        if self.info is None:
            self.info = self._call("describe")
        state = self.state_dict()
        for name, data in to_files("buffer", state["buffer"], self.buffer_cfg.shard_mb << 20).items():
            files[name] = self.store.put(step, name, data)
        files[TRAIN_STATE] = self.store.put(step, TRAIN_STATE, json.dumps({"replay": state["replay"], "step": step}).encode())
        return files

    def load(self, ref: CheckpointRef, legacy: dict[str, Any] | None = None) -> int:
        """Restore learner, buffer and schedule from a verified checkpoint; returns its step."""
        step = self._call("load", ref)
        manifest = self.store.manifest(ref)["files"]
        meta = json.loads(self.store.read(ref, TRAIN_STATE)) if TRAIN_STATE in manifest else {"replay": (legacy or {}).get("replay", {})}
        buffer = from_files("buffer", lambda name: self.store.read(ref, name))
        self.load_state_dict({"buffer": buffer, "replay": meta["replay"], "step": step})
        if self.info is None:
            self.info = self._call("describe")
        return step
