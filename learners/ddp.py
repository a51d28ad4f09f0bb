"""Data-parallel learner workers: one model trained by N Ray Train workers with torch DDP.

With ``train.num_workers: N > 1`` the train stage drives a :class:`LearnerGroup`
instead of one learner actor. The group offers the learner actor's calls
(``train_step``, ``save``, ``load``, ``evaluate``, ``finite``, ``ping``) as plain
methods, so the stage, the supervisor and the run checkpoint do not change.

Who holds what (the mailbox and the workers' loop: learners/ddp_worker.py)::

    driver (the daemon)        LearnerGroup: the batch split, one StepStats per step,
    │                          a thread blocked in TorchTrainer.fit()
    ├─ mailbox actor           _Mailbox (async, 0 CPU): a command queue per rank and the
    │                          results of each command; owned by the driver
    └─ Ray Train controller    TorchTrainer (Ray Train V2), FailureConfig(max_failures=0)
       └─ worker 0..N-1        each: a Learner(rank, world_size) whose ``net`` is
                               DistributedDataParallel(model) over the process group Ray
                               Train set up (gloo on the CPU, nccl on GPUs); the loop
                               _worker_loop takes commands from the mailbox until "stop"

A step: the driver splits the rows across ranks (``np.array_split``; a rank
left without rows gets one row that predicts nothing, so it still joins the
all-reduce), posts one command per rank with the predicted-token count of the
whole batch, and waits for the results in the same call to the mailbox. Each
rank's learner divides its summed loss by ``total_tokens / world_size``; DDP
averages the gradients over the ranks, so the step equals the single learner's
step on the whole batch (tests/integration/test_ddp.py compares them). The group
returns one StepStats: the token-weighted loss over ranks, the global token
count, rank 0's step, learning rate and (synced) gradient norm, the driver's
wall time. A step is skipped (non-finite loss or gradient) on every rank or on
none: the gradient norm is computed after the all-reduce. Ranks that disagree
anyway raise ``StageFailed`` (no dead actor): the supervisor reloads the newest
checkpoint on every rank.

Checkpoints stay one unit: ``save`` runs on rank 0 alone (it uses no
collective, so the other ranks are not needed and cannot deadlock) and writes
the same files a single learner writes; ``load`` runs on every rank, which
then hold the same weights, optimizer state and step. A checkpoint written by
a group loads into a single learner and the other way round. ``evaluate``,
``finite`` and ``ping`` run on rank 0.

When a worker dies: Ray Train's controller notices within its health-check
interval (2 s) and, with ``max_failures=0``, ends the run and tears the worker
group down; ``fit()`` returns in the driver's thread, which marks the mailbox
failed; every wait of the driver wakes on that (and otherwise polls at most
every ``WAIT_S``). The call in progress raises ``StageFailed("train", ...,
actor_died=True)``, the supervisor stops the group, starts a new one and loads
the newest verified checkpoint. A command that raises on a rank during a step
(a surviving rank's all-reduce fails at once when its peer is gone; the ranks
are then out of step, maybe blocked in a collective) is reported the same way,
without waiting for the other ranks. From then on every call of the group
raises so. An error of a non-collective command (``save``, ``load``: storage
down, non-finite weights) is raised as itself, as the learner actor's would be,
and the group goes on.

``stop`` asks every rank to leave its loop, waits for the run to end, kills the
workers that did not (the controller then ends the run), kills the mailbox and
removes Ray Train's run directory (a temporary directory: the group needs no
storage of Ray Train's; its checkpoints are the learner's own files). Stores on
local paths are passed to the workers as absolute paths (Ray Train changes the
workers' directory).

Costs, measured on the 2-core development machine under load (tiny models, so
the fixed costs show): starting the group (controller, placement group, two
worker processes importing torch and Ray Train, the gloo process group) takes
15-35 s where a learner actor takes ~4 s; it overlaps the daemon's own start.
Each call goes driver -> mailbox -> ranks -> mailbox -> driver: ~3 ms for a
``ping`` (the actor's: ~1 ms) and ~5 ms per step beyond the ranks' compute (the
actor's ``ray.get``: ~1.5 ms). A killed worker fails the call in flight within
milliseconds (gloo sees the peer gone) or, idle, within the controller's 2 s
health check; ``stop`` takes ~0.5-2 s.

Needs ``ray[train]`` (pandas and pyarrow) and Ray Train V2, the default of Ray
2.60. With a GPU per worker (``train.num_gpus``), each rank uses the device Ray
Train gave it and the process group is NCCL's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from everlearn.errors import ConfigError, StageFailed
from everlearn.learners.checkpoints import CheckpointRef, FileEntry
from everlearn.learners.config import ModelConfig, TrainConfig
from everlearn.learners.ddp_worker import (
    RPC_GRACE_S,
    WAIT_S,
    _Mailbox,
    _worker_loop,
    weights_digest,
)
from everlearn.learners.learner import StepStats, predicted_tokens
from everlearn.learners.schedules import ScheduleConfig

__all__ = ["LearnerGroup", "combine", "weights_digest"]


# -- the driver's side -------------------------------------------------------------------------
class LearnerGroup:
    """``num_workers`` data-parallel learners behind the learner actor's calls (see the module docstring).

    ``start()`` returns at once (like creating the learner actor); the first call waits until every
    rank has built its model, at most ``start_timeout_s``.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, schedule_cfg: ScheduleConfig, store_url: str,
                 storage_options: dict | None = None, store_timeout_s: float = 60.0, env_vars: dict[str, str] | None = None,
                 start_timeout_s: float = 300.0, stop_grace_s: float = 15.0):
        self.model_cfg, self.train_cfg, self.schedule_cfg = model_cfg, train_cfg, schedule_cfg
        if "://" not in store_url:  # Ray Train runs workers in a directory of its own: relative paths would move
            store_url = os.path.abspath(store_url)
        self.store_url, self.storage_options, self.store_timeout_s = store_url, storage_options, store_timeout_s
        self.world_size = train_cfg.num_workers
        self.env_vars = dict(env_vars or {})
        self.start_timeout_s, self.stop_grace_s = start_timeout_s, stop_grace_s
        self.workers: list[dict[str, Any]] = []  # by rank: pid, actor (Ray Train's worker actor), node_id
        self._mailbox = None
        self._thread: threading.Thread | None = None
        self._storage: str | None = None
        self._fit_error: BaseException | None = None
        self._seq = 0
        self._ready = False
        self._broken: str | None = None  # why the group cannot go on (a worker died or failed in a step)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> LearnerGroup:
        """Start the Ray Train run in a thread of this process and return (the workers build their models meanwhile)."""
        import ray.train  # ray[train]: pandas and pyarrow beside ray
        import ray.train.torch

        if self._mailbox is not None:
            return self
        self.workers, self._fit_error, self._broken, self._ready = [], None, None, False
        if not ray.train.torch.TorchTrainer.__module__.startswith("ray.train.v2"):
            raise ConfigError("train.num_workers > 1 needs Ray Train V2; unset RAY_TRAIN_V2_ENABLED=0")
        train = self.train_cfg
        if train.num_cpus <= 0:
            raise ConfigError("train.num_workers > 1 needs train.num_cpus > 0: each worker reserves its CPUs in Ray Train's placement group")
        use_gpu = train.num_gpus > 0
        resources = {"CPU": train.num_cpus} | ({"GPU": train.num_gpus} if use_gpu else {}) | train.resources
        self._mailbox = ray.remote(_Mailbox).options(num_cpus=0, max_restarts=0).remote(self.world_size)
        self._storage = tempfile.mkdtemp(prefix="everlearn-ray-train-")
        cfg = {"model": self.model_cfg, "train": train, "schedule": self.schedule_cfg, "store_url": self.store_url,
               "storage_options": self.storage_options, "store_timeout_s": self.store_timeout_s, "mailbox": self._mailbox}
        trainer = ray.train.torch.TorchTrainer(
            _worker_loop,
            train_loop_config=cfg,
            torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=self.world_size, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name="learners", storage_path=self._storage,
                failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=0),
                worker_runtime_env={"env_vars": self.env_vars} if self.env_vars else None),
        )
        self._thread = threading.Thread(target=self._fit, args=(trainer, self._mailbox), name="everlearn-learner-group", daemon=True)
        self._thread.start()
        return self

    def _fit(self, trainer, mailbox) -> None:
        """The driver's thread: TorchTrainer.fit() returns when the run ends (stopped, or a worker died)."""
        try:
            trainer.fit()
            reason = "the learner workers' Ray Train run ended"
        except BaseException as e:  # whatever ended the run is reported to the waiting calls
            self._fit_error = e
            reason = f"the learner workers' Ray Train run failed ({type(e).__name__}: {_first_line(e)})"
        if ray.is_initialized():  # (a remote call after ray.shutdown() would start a new Ray)
            with contextlib.suppress(Exception):
                mailbox.fail.remote(reason)

    def stop(self) -> None:
        """End the run: every rank leaves its loop; workers that do not are killed. Idempotent.

        Waits at most twice ``stop_grace_s``. A group stopped before its workers started leaves Ray
        Train's controller to give up by itself (it holds no CPUs while it waits for them; its
        workers, if they start, find the mailbox gone and end the run).
        """
        mailbox, thread = self._mailbox, self._thread
        if mailbox is None:
            return
        with contextlib.suppress(Exception):
            ray.get(mailbox.stop_all.remote(), timeout=5)
        if thread is not None:
            thread.join(self.stop_grace_s if self.workers else min(self.stop_grace_s, 5.0))
            if thread.is_alive() and self.workers:  # a rank stuck in a collective or a long call: the controller ends the run
                for w in self.workers:
                    with contextlib.suppress(Exception):
                        ray.kill(w["actor"], no_restart=True)
                thread.join(self.stop_grace_s)
        with contextlib.suppress(Exception):
            ray.kill(mailbox, no_restart=True)
        if self._storage:
            shutil.rmtree(self._storage, ignore_errors=True)
        self._mailbox, self._storage, self._ready = None, None, False

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- waits -------------------------------------------------------------------------------
    def _died(self, why: str, cause: BaseException | None = None) -> StageFailed:
        """The error every call raises from now on: the group is done, the supervisor starts a new one."""
        self._broken = self._broken or why
        err = StageFailed("train", f"a data-parallel learner worker died ({why})", actor_died=True)
        err.__cause__ = cause or self._fit_error
        return err

    def _get(self, ref):
        try:
            return ray.get(ref, timeout=WAIT_S + RPC_GRACE_S)
        except GetTimeoutError as e:
            raise self._died(f"the learner group's mailbox did not answer in {WAIT_S + RPC_GRACE_S:.0f} s", e) from e
        except RayActorError as e:
            raise self._died(f"the learner group's mailbox died: {_first_line(e)}", e) from e

    def _check_running(self) -> None:
        if self._mailbox is None:
            raise self._died("the learner group is stopped")
        if self._broken:
            raise self._died(self._broken)
        if not self.running():
            why = f"{type(self._fit_error).__name__}: {_first_line(self._fit_error)}" if self._fit_error else "its run ended"
            raise self._died(why)

    def _wait_ready(self) -> None:
        if self._ready:
            return
        self._check_running()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            reply = self._get(self._mailbox.ready.remote(WAIT_S))
            if reply is not None and reply[0] == "ready":
                self.workers = [reply[1][r] for r in range(self.world_size)]
                self._ready = True
                return
            if reply is not None and reply[0] == "error":
                _, rank, exc = reply
                raise self._died(f"worker {rank} could not start: {type(exc).__name__}: {_first_line(exc)}", exc)
            if reply is not None:
                raise self._died(reply[1])
            self._check_running()
            if time.monotonic() > deadline:
                raise self._died(f"the {self.world_size} learner workers did not start within {self.start_timeout_s:.0f} s")

    def _run(self, cmds: dict[int, tuple[str, tuple]], collective: bool) -> dict[int, Any]:
        """Post one command per rank and wait for every answer (a collective: or the first error)."""
        self._check_running()
        self._wait_ready()
        self._seq += 1
        seq = self._seq
        reply = self._get(self._mailbox.post.remote(seq, cmds, collective, WAIT_S))
        while reply is None:
            self._check_running()
            reply = self._get(self._mailbox.collect.remote(seq, WAIT_S))
        if reply[0] == "failed":
            raise self._died(reply[1])
        results = reply[1]
        for rank, (ok, value) in sorted(results.items()):
            if ok:
                continue
            method = cmds[rank][0]
            if collective:  # the ranks are out of step, some maybe blocked in an all-reduce: a new group
                raise self._died(f"worker {rank} failed in {method}: {type(value).__name__}: {_first_line(value)}", value)
            raise value
        return {rank: value for rank, (_, value) in results.items()}

    # -- the learner actor's calls ------------------------------------------------------------
    def train_step(self, tokens: np.ndarray, lengths: np.ndarray | None = None, lr_scale: float = 1.0) -> StepStats:
        """One optimizer step on the whole batch, its rows split across the ranks."""
        t0 = time.perf_counter()
        if lengths is None:
            lengths = np.full(len(tokens), tokens.shape[1], dtype=np.int32)
        total = predicted_tokens(lengths)
        cmds = {}
        for rank, rows in enumerate(np.array_split(np.arange(len(tokens)), self.world_size)):
            part, part_lengths = tokens[rows], lengths[rows]
            if not len(rows):  # still joins the all-reduce, with a row that predicts nothing
                part, part_lengths = np.zeros((1, tokens.shape[1]), tokens.dtype), np.ones(1, lengths.dtype)
            cmds[rank] = ("train_step", (part, part_lengths, lr_scale, total))
        results = self._run(cmds, collective=True)
        return combine([results[r] for r in range(self.world_size)], time.perf_counter() - t0)

    def save(self, step: int) -> dict[str, FileEntry]:
        """Rank 0 writes the checkpoint's learner files (the ranks hold the same weights)."""
        return self._run({0: ("save", (step,))}, collective=False)[0]

    def load(self, ref: CheckpointRef) -> int:
        """Every rank loads the checkpoint; returns its step."""
        steps = self._run({r: ("load", (ref,)) for r in range(self.world_size)}, collective=False)
        return steps[0]

    def evaluate(self, tokens: np.ndarray, lengths: np.ndarray) -> float:
        return self._run({0: ("evaluate", (tokens, lengths))}, collective=False)[0]

    def finite(self) -> bool:
        return self._run({0: ("finite", ())}, collective=False)[0]

    def ping(self) -> int:
        return self._run({0: ("ping", ())}, collective=False)[0]

    def describe(self) -> dict[str, Any]:
        return self._run({0: ("describe", ())}, collective=False)[0]

    def digests(self) -> list[str]:
        """sha256 of each rank's weights (all equal while the ranks are in step)."""
        results = self._run({r: ("digest", ()) for r in range(self.world_size)}, collective=False)
        return [results[r] for r in range(self.world_size)]


def combine(stats: list[StepStats], seconds: float) -> StepStats:
    """The ranks' stats of one step as one: token-weighted loss, global tokens, rank 0's step, LR and synced gradient norm."""
    first = stats[0]
    if len({s.step for s in stats}) > 1 or len({s.skipped is None for s in stats}) > 1:
        raise StageFailed("train", "data-parallel workers disagree after a step (steps "
                          f"{[s.step for s in stats]}, skipped {[s.skipped for s in stats]}); restoring the newest checkpoint")
    n_tokens = sum(s.tokens for s in stats)
    loss = sum(s.loss * s.tokens for s in stats) / max(n_tokens, 1)
    skipped = first.skipped
    if skipped is not None:  # skipped on every rank; a non-finite loss is named first (its documents are quarantined)
        skipped = next((s.skipped for s in stats if s.skipped.startswith("non-finite loss")), skipped)
    return StepStats(step=first.step, loss=loss, lr=first.lr, grad_norm=first.grad_norm, tokens=n_tokens, seconds=seconds,
                     skipped=skipped)


def _first_line(e: BaseException | None) -> str:
    """The start of an error's message on one line (Ray Train's run errors put the worker's error on later lines)."""
    return " ".join(str(e).split())[:300] if e is not None else ""
