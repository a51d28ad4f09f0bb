"""Anneal branches: a copy of the trunk, annealed briefly, is the candidate a judgement sees (``gate.candidate: anneal_branch``).

The infinite schedule (schedules.py) keeps the trunk at ``constant_lr`` for as
long as the stream lasts; its phase 4, an exponential anneal to ``min_lr``
over ``schedule.anneal_steps`` steps, gives the lower loss a finished run would
have, but a trunk that annealed could not go on learning at the constant rate.
So at a judgement the trunk's checkpoint S is *branched*: a copy of it anneals
beside the trunk, in an actor of its own, and becomes the candidate, while the
trunk trains on.

    trunk checkpoint S (the run's store)           branch candidate (<checkpoints>/branches)
      model / adapter, optimizer.pt, learner.json  ->  Learner.load(S), anneal_start = S,
      branch.safetensors: the anneal's batches          anneal_steps x train_step(batch i)
                                                   ->  step-S/: model / adapter, optimizer.pt, learner.json
                                                       manifest meta: the trunk it came from, the steps

The job is a pure function of checkpoint S: ``branch.safetensors`` holds every
row of the anneal's batches (``tokens`` int32 [anneal_steps x batch, seq_len],
``lengths``): per step, the most recent fresh windows the trunk trained on
(oldest first, as many per batch as the trunk's own batches hold fresh) and
the rest replay, sampled from the trunk's buffer with a seed derived from S
(the buffer's own random stream is never touched: the trunk is unchanged by a
branch). It also holds ``ring``, the newest fresh windows themselves, so that a
resumed run branches later checkpoints exactly as an uninterrupted one would. A
branch killed half way is run again from S after a restart and yields the same
bytes; a branch whose candidate is already committed is not run again.

Branch candidates live in a store of their own: the run's store holds only
trunk checkpoints, its resume points; a branch there would be resumed from.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import safetensors.numpy

from everlearn.errors import (
    CheckpointCorruptError,
    CheckpointError,
    NonFiniteError,
    StorageUnavailable,
)
from everlearn.learners.checkpoints import CheckpointRef, CheckpointStore
from everlearn.learners.config import ModelConfig, TrainConfig
from everlearn.learners.schedules import ScheduleConfig

BRANCH_DATA = "branch.safetensors"
BRANCHES = "branches"  # the branches store: <checkpoint url>/branches
SEED_TAG = 0xA77EA1  # mixed into the replay seed of a branch, so it never equals another stream's


def branches_url(checkpoint_url: str) -> str:
    """Where the branch candidates of the run whose checkpoints are at ``checkpoint_url`` live."""
    return f"{checkpoint_url.rstrip('/')}/{BRANCHES}"


def can_anneal(step: int, cfg: ScheduleConfig) -> bool:
    """An anneal may start only in the constant phase (``infinite_lr``)."""
    return step >= cfg.warmup_steps + cfg.cooldown_steps


class FreshRing:
    """The newest ``capacity`` fresh windows the trunk trained on, oldest first (bounded: capacity x seq_len int32)."""

    def __init__(self, capacity: int, seq_len: int):
        self.capacity, self.seq_len = capacity, seq_len
        self._rows = np.zeros((capacity, seq_len), dtype=np.int32)
        self._next = 0  # slot the next window goes to
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, windows: np.ndarray) -> None:
        for row in np.asarray(windows, dtype=np.int32)[-self.capacity :]:
            self._rows[self._next] = row
            self._next = (self._next + 1) % self.capacity
            self._size = min(self._size + 1, self.capacity)

    def rows(self) -> np.ndarray:
        """The kept windows, oldest first (a copy)."""
        if self._size < self.capacity:
            return self._rows[: self._size].copy()
        return np.concatenate([self._rows[self._next :], self._rows[: self._next]])

    def load(self, rows: np.ndarray | None) -> None:
        self._rows[:] = 0
        self._next = self._size = 0
        if rows is not None and len(rows):
            if rows.shape[1] != self.seq_len:
                raise ValueError(f"the checkpoint's fresh windows are {rows.shape[1]} tokens long, train.seq_len is {self.seq_len}")
            self.add(rows)


def anneal_batches(recent: np.ndarray, buffer, fresh_per_step: Sequence[int], batch_size: int,
                   seed: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(tokens, lengths, fresh rows per step) of the anneal's batches, step after step; None when there is no data.

    Step i holds ``fresh_per_step[i]`` of the newest fresh windows ``recent`` (oldest first, in the order
    the trunk trained them), then replay: rows of ``buffer`` drawn with a generator seeded by ``seed``
    (the buffer's own random state is left alone). With fewer fresh windows than asked, the last steps
    replay more; with an empty buffer, the fresh windows are repeated.
    """
    recent = np.asarray(recent, dtype=np.int32)
    want = int(sum(fresh_per_step))
    fresh = recent[max(0, len(recent) - want) :]
    if len(fresh) == 0 and len(buffer) == 0:
        return None
    seq_len = buffer.seq_len if len(fresh) == 0 else fresh.shape[1]
    n_replay = len(fresh_per_step) * batch_size - len(fresh)
    if n_replay and len(buffer):
        replay, replay_lengths = buffer.sample_with_lengths(n_replay, np.random.default_rng([*seed, SEED_TAG]))
    else:
        replay, replay_lengths = fresh[np.arange(n_replay) % max(len(fresh), 1)], np.full(n_replay, seq_len, dtype=np.int32)
    tokens = np.empty((len(fresh_per_step) * batch_size, seq_len), dtype=np.int32)
    lengths = np.empty(len(tokens), dtype=np.int32)
    counts = np.empty(len(fresh_per_step), dtype=np.int32)
    f = r = 0
    for i, n_fresh in enumerate(fresh_per_step):
        k = min(int(n_fresh), len(fresh) - f)
        rows = slice(i * batch_size, (i + 1) * batch_size)
        tokens[rows] = np.concatenate([fresh[f : f + k], replay[r : r + batch_size - k]])
        lengths[rows] = np.concatenate([np.full(k, seq_len, dtype=np.int32), replay_lengths[r : r + batch_size - k]])
        counts[i], f, r = k, f + k, r + batch_size - k
    return tokens, lengths, counts


def encode_data(step: int, batch_size: int, ring: np.ndarray, batches: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> bytes:
    """``branch.safetensors`` of trunk checkpoint ``step``: the fresh ring, and the anneal's batches when there are any."""
    arrays = {"ring": np.ascontiguousarray(ring, dtype=np.int32), "meta": np.array([step, batch_size], dtype=np.int64)}
    if batches is not None:
        arrays.update(tokens=batches[0], lengths=batches[1], fresh=batches[2])
    return safetensors.numpy.save(arrays)


def decode_data(data: bytes) -> dict[str, Any]:
    """The arrays of ``branch.safetensors``, with ``step`` and ``batch_size``."""
    arrays = dict(safetensors.numpy.load(data))
    step, batch_size = (int(x) for x in arrays.pop("meta"))
    return {**arrays, "step": step, "batch_size": batch_size}


class BranchJob:
    """Anneals a copy of the trunk from one of its checkpoints and commits the candidate into the branches store.

    A Ray actor of the supervisor (daemon/branching.py); a plain class, so tests run it in-process.
    Its learner is kept between jobs (a model is built once); ``Learner.load`` replaces all of its state.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, schedule_cfg: ScheduleConfig, trunk_url: str,
                 branches: str, storage_options: dict | None = None, timeout_s: float = 60.0):
        self.model_cfg, self.train_cfg, self.schedule_cfg = model_cfg, train_cfg, schedule_cfg
        self.trunk = CheckpointStore(trunk_url, storage_options, timeout_s=timeout_s)
        self.branches = CheckpointStore(branches, storage_options, timeout_s=timeout_s)
        self.learner = None

    def ping(self) -> bool:
        return True

    def run(self, name: str, manifest_sha256: str | None = None, protect: Iterable[str] = ()) -> dict[str, Any]:
        """Branch trunk checkpoint ``name`` (its manifest sha256, when known, is checked); returns the candidate and the numbers.

        ``protect``: branch checkpoints that must not be moved (served, judged): a committed branch of
        another trunk checkpoint at this step is set aside, unless it is one of them.
        """
        t0 = time.perf_counter()
        trunk = self.trunk.ref(name)
        if manifest_sha256 and trunk.manifest_sha256 != manifest_sha256:
            raise CheckpointError(f"trunk checkpoint {trunk.uri} changed since the branch was planned (manifest sha256 "
                                  f"{trunk.manifest_sha256[:12]} != {manifest_sha256[:12]})")
        done, set_aside = self._existing(trunk, set(protect))
        if done is not None:
            return {"candidate": done.to_dict(), "trunk": trunk.to_dict(), "steps": 0, "reused": True, "set_aside": set_aside,
                    "seconds": time.perf_counter() - t0}
        try:
            out = self._anneal(trunk, decode_data(self.trunk.read(trunk, BRANCH_DATA)))
        except BaseException:
            self.learner = None  # a learner that failed half way is never reused
            raise
        return {**out, "trunk": trunk.to_dict(), "reused": False, "set_aside": set_aside + out["set_aside"],
                "seconds": time.perf_counter() - t0}

    def _existing(self, trunk: CheckpointRef, protect: set[str]) -> tuple[CheckpointRef | None, list]:
        """The committed candidate of ``trunk`` when there is one (a branch that finished before a restart)."""
        try:
            ref = self.branches.ref(trunk.name)
        except StorageUnavailable:
            raise
        except CheckpointError:
            return None, []  # none, or never committed: begin() moves a leftover aside
        try:
            meta = self.branches.manifest(ref).get("meta", {}).get("branch", {})
            if meta.get("trunk", {}).get("manifest_sha256") == trunk.manifest_sha256:
                self.branches.verify(ref)
                return ref, []
            why = f"a branch of another trunk checkpoint of step {trunk.step} (the step was trained again after a recovery)"
        except CheckpointCorruptError as e:
            why = f"damaged: {e}"
        if ref.name in protect:
            raise CheckpointError(f"{ref.uri} is {why} and still served or judged; it is not replaced")
        return None, [list(self.branches.set_aside(ref.name, why))]

    def _anneal(self, trunk: CheckpointRef, data: dict[str, Any]) -> dict[str, Any]:
        from everlearn.learners.learner import Learner  # torch: only where a branch runs

        cfg, steps = self.schedule_cfg, self.schedule_cfg.anneal_steps
        if "tokens" not in data:
            raise ValueError(f"{trunk.uri}/{BRANCH_DATA} holds no anneal batches (no fresh windows and an empty buffer)")
        batch = data["batch_size"]
        if len(data["tokens"]) != steps * batch:
            raise ValueError(f"{trunk.uri}/{BRANCH_DATA} holds {len(data['tokens'])} rows for {steps} steps of {batch}: "
                             "schedule.anneal_steps or train.batch_size changed since it was written")
        if self.learner is None:
            self.learner = Learner(self.model_cfg, self.train_cfg, cfg, self.trunk.url, self.trunk.storage_options, self.trunk.timeout_s)
        learner = self.learner
        learner.store = self.trunk
        start = learner.load(trunk)
        if not can_anneal(start, cfg):
            raise ValueError(f"{trunk.name} is at step {start}, in warmup/cooldown (< {cfg.warmup_steps + cfg.cooldown_steps}): "
                             "an anneal may start only in the constant phase")
        learner.schedule.anneal_start = start
        lrs, losses = [], []
        for i in range(steps):
            rows = slice(i * batch, (i + 1) * batch)
            stats = learner.train_step(data["tokens"][rows], data["lengths"][rows])
            if stats.skipped:
                raise NonFiniteError(f"anneal step {i + 1} of {steps} from {trunk.name}: {stats.skipped}")
            lrs.append(stats.lr)
            losses.append(stats.loss)
        learner.store = self.branches
        moved = self.branches.begin(trunk.step).moved
        files = learner.save(trunk.step)
        fresh = int(data["fresh"].sum())
        meta = {"branch": {"trunk": trunk.to_dict(), "anneal_start": start, "anneal_steps": steps, "learner_step": learner.step,
                           "fresh_rows": fresh, "replay_rows": len(data["tokens"]) - fresh, "lr_first": lrs[0], "lr_last": lrs[-1]}}
        ref = self.branches.commit(trunk.step, files, meta=meta)
        return {"candidate": ref.to_dict(), "steps": steps, "lrs": lrs, "losses": losses, "fresh_rows": fresh,
                "replay_rows": len(data["tokens"]) - fresh, "set_aside": [list(m) for m in moved]}
