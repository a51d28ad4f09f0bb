"""The worker side of data-parallel learners (learners/ddp.py): the mailbox actor and each rank's loop.

The driver's ``LearnerGroup`` posts one command per rank to the mailbox; each
Ray Train worker runs ``_worker_loop``: it builds a ``Learner(rank, world_size)``
whose forward runs through DistributedDataParallel, then takes commands until
``stop``. Errors travel back as exceptions any process can unpickle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import inspect
import os
import time
import traceback
from typing import Any

import ray

from everlearn.learners.config import TrainConfig

WAIT_S = 2.0  # longest a driver or worker waits in one mailbox call before it checks on the run
RPC_GRACE_S = 60.0  # a mailbox call that has not answered WAIT_S + this later: the mailbox is gone
STOP = "stop"
_COMMANDS = {"train_step", "save", "load", "evaluate", "finite", "ping", "digest", "describe"}


# -- the mailbox (an actor of its own) ------------------------------------------------------
class _Mailbox:
    """Commands from the driver to each rank and their results back; wakes every waiter on failure."""

    def __init__(self, world_size: int):
        self.world = world_size
        self.inbox: list[collections.deque] = [collections.deque() for _ in range(world_size)]
        self.expect: dict[int, tuple[set[int], bool]] = {}  # seq -> (ranks that answer, collective)
        self.results: dict[int, dict[int, tuple[bool, Any]]] = {}
        self.workers: dict[int, dict[str, Any]] = {}
        self.startup_error: tuple[int, BaseException] | None = None
        self.failed: str | None = None
        self.cond = asyncio.Condition()

    async def _wait(self, ready, wait_s: float) -> bool:
        """Wait (holding the condition's lock) until ``ready()`` or ``wait_s``; returns ``ready()``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.cond.wait_for(ready), wait_s)
        return bool(ready())

    # the workers' side
    async def register(self, rank: int, info: dict[str, Any] | None, error: BaseException | None) -> None:
        async with self.cond:
            if error is not None:
                self.startup_error = self.startup_error or (rank, error)
            else:
                self.workers[rank] = info
            self.cond.notify_all()

    async def exchange(self, rank: int, seq: int | None, result: tuple[bool, Any] | None, wait_s: float):
        """Post the result of command ``seq`` (if any), then wait for this rank's next command (None: none yet)."""
        async with self.cond:
            if seq is not None and seq in self.results:
                self.results[seq][rank] = result
                self.cond.notify_all()
            if not await self._wait(lambda: self.inbox[rank] or self.failed is not None, wait_s):
                return None
            return (None, STOP, ()) if self.failed is not None else self.inbox[rank].popleft()

    # the driver's side
    async def ready(self, wait_s: float):
        """("ready", workers) once every rank registered; ("error", rank, exc) or ("failed", why); None: not yet."""
        async with self.cond:
            await self._wait(lambda: len(self.workers) == self.world or self.startup_error or self.failed, wait_s)
            if self.startup_error is not None:
                return ("error", *self.startup_error)
            if len(self.workers) == self.world:
                return ("ready", dict(self.workers))
            return ("failed", self.failed) if self.failed is not None else None

    async def post(self, seq: int, cmds: dict[int, tuple[str, tuple]], collective: bool, wait_s: float):
        async with self.cond:
            self.expect[seq] = (set(cmds), collective)
            self.results[seq] = {}
            for rank, (method, args) in cmds.items():
                self.inbox[rank].append((seq, method, args))
            self.cond.notify_all()
        return await self.collect(seq, wait_s)

    async def collect(self, seq: int, wait_s: float):
        """("results", {rank: (ok, value)}) when every rank answered (a collective: or one failed);
        ("failed", why) when the run ended; None after ``wait_s``."""
        ranks, collective = self.expect[seq]
        got = self.results[seq]

        def complete() -> bool:
            return set(got) >= ranks or (collective and any(not ok for ok, _ in got.values()))

        async with self.cond:
            if not await self._wait(lambda: complete() or self.failed is not None, wait_s):
                return None
            if complete():
                del self.expect[seq], self.results[seq]
                return ("results", got)
            return ("failed", self.failed)

    async def stop_all(self) -> None:
        async with self.cond:
            for box in self.inbox:
                box.append((None, STOP, ()))
            self.cond.notify_all()

    async def fail(self, reason: str) -> None:
        async with self.cond:
            self.failed = self.failed or reason
            self.cond.notify_all()


# -- the workers (Ray Train's training function) ----------------------------------------------
class _Worker:
    """One rank: a Learner whose ``net`` is wrapped in DistributedDataParallel."""

    def __init__(self, cfg: dict[str, Any], rank: int, world_size: int):
        import ray.train.torch
        import torch
        from torch.nn.parallel import DistributedDataParallel

        from everlearn.learners.learner import Learner

        train: TrainConfig = cfg["train"]
        if train.num_gpus > 0 and torch.cuda.is_available():  # the GPU Ray Train gave this rank
            torch.cuda.set_device(ray.train.torch.get_device())
        self.learner = learner = Learner(cfg["model"], train, cfg["schedule"], cfg["store_url"], cfg["storage_options"],
                                         cfg["store_timeout_s"], rank=rank, world_size=world_size)
        device_ids = [torch.cuda.current_device()] if learner.device.type == "cuda" else None
        # buffers (rotary tables) are the same on every rank: no broadcast before each forward
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(learner.model, device_ids=device_ids, **no_buffer_sync)
        learner.net = torch.compile(ddp, backend=train.compile_backend) if train.compile else ddp
        self.rank = rank

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "pid": os.getpid(), "actor": ctx.current_actor, "node_id": ctx.get_node_id()}

    def run(self, method: str, args: tuple) -> Any:
        if method not in _COMMANDS:
            raise ValueError(f"unknown learner command {method!r}")
        if method == "digest":
            return self.digest()
        return getattr(self.learner, method)(*args)

    def digest(self) -> str:
        return weights_digest(self.learner.model)


def weights_digest(model) -> str:
    """sha256 of every weight's name and bytes, any dtype (ranks in step hold the same)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _portable(e: BaseException, rank: int) -> BaseException:
    """The exception as it can travel to the driver, with where it happened in a note."""
    from ray import cloudpickle

    where = f"in data-parallel learner worker {rank} (pid {os.getpid()}):\n" + "".join(traceback.format_exception(e)[-8:])
    try:
        e.add_note(where)
        cloudpickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}\n{where}")


def _worker_loop(cfg: dict[str, Any]) -> None:
    """Ray Train's per-worker function: build the rank's learner, then serve the driver's commands until stop."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    mailbox = cfg["mailbox"]
    deadline = WAIT_S + RPC_GRACE_S
    t0 = time.time()
    try:
        worker = _Worker(cfg, rank, world_size)
    except BaseException as e:
        with contextlib.suppress(Exception):
            ray.get(mailbox.register.remote(rank, None, _portable(e, rank)), timeout=deadline)
        raise
    info = worker.info() | {"loop_started": t0, "build_s": round(time.time() - t0, 3)}
    ray.get(mailbox.register.remote(rank, info, None), timeout=deadline)
    seq, result = None, None
    while True:  # a dead mailbox (the driver is gone) raises here: the run ends
        msg = ray.get(mailbox.exchange.remote(rank, seq, result, WAIT_S), timeout=deadline)
        seq, result = None, None
        if msg is None:
            continue
        seq, method, args = msg
        if method == STOP:
            return
        try:
            result = (True, worker.run(method, args))
        except Exception as e:
            result = (False, _portable(e, rank))
