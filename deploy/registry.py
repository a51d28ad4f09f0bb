"""The serving registry: the version every replica of one application must hold, and what each one holds.

One named, detached Ray actor per Serve application (``<app>.registry`` in the
``everlearn-serving`` namespace, restarted by Ray whenever it dies)::

    daemon   ── set(record) ──────────────> registry <── watch(known, timeout) ── replica (background thread)
    Server   ── wait_for(version, sha, n) ─>          <── report(replica, state) ──

A swap is a ``set``: every replica's long-poll returns at once, the replica loads
the new weights off the request path and reports its manifest sha256 (or the
error it got); ``wait_for`` answers when enough live replicas hold the record,
or as soon as one says it cannot load it. Nothing is redeployed, so no replica
restarts and in-flight requests finish on the weights they started with.

The heartbeat also carries each replica's cumulative serving counters
(deploy/serving_metrics.py); ``metrics`` sums them over every replica the
registry knows, plus those it has forgotten (``retired``), so the totals any
replica exposes at /metrics only grow while the registry lives.

SERVED.json beside the checkpoints stays the durable truth: a registry that
(re)starts reads the promoted record from it, so a replica that (re)starts
while the daemon is away still loads the promoted version.
"""

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from everlearn.deploy.serving_metrics import REPLICA_STATES, Retired, clean, empty, merge, newest

SERVED = "SERVED.json"  # written by deploy/promote.py: the commit point of a promotion
RECORD_KEYS = ("version", "uri", "name", "step", "manifest_sha256", "promoted_unix")  # the promoted record, as in SERVED.json
NAMESPACE = "everlearn-serving"  # explicit: the daemon, the replicas and a restarted daemon all find the actor
HEARTBEAT_S = 1.0  # a replica reports at least this often (its long-poll's timeout)
FRESH_S = 5.0  # a replica not heard from for this long is taken as gone (5 heartbeats: a GC pause is not a death)
FORGET_S = 300.0  # reports older than this are dropped, so replicas that came and went do not pile up
REREAD_S = 5.0  # without a record, SERVED.json is read again at most this often
log = logging.getLogger(__name__)


def registry_name(app_name: str) -> str:
    return f"{app_name}.registry"


def holds(replica: dict[str, Any], version: int, sha: str | None) -> bool:
    """Whether a replica's report says it serves this record: by manifest sha256, by version where there is none."""
    return replica.get("manifest_sha256") == sha if sha else replica.get("version") == version


def replica_state(replica: dict[str, Any], record: dict[str, Any] | None) -> str:
    """``current`` (holds the promoted record), ``failed`` (reports it cannot load it), ``stale`` (holds another), ``empty``."""
    if record is not None:
        version, sha = record["version"], record.get("manifest_sha256")
        if holds(replica, version, sha):
            return "current"
        error = replica.get("error")
        if isinstance(error, dict) and holds(error, version, sha):
            return "failed"
    return "stale" if replica.get("version") is not None else "empty"


class RegistryState:
    """The registry's data and rules, shared by the Ray actor and the in-memory double (``clock``: seconds)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.epoch = uuid.uuid4().hex[:8]  # a restarted registry starts a new epoch: a replica's old token never matches
        self.seq = 0
        self.record: dict[str, Any] | None = None
        self.replicas: dict[str, dict[str, Any]] = {}
        self.deployed_sha: str | None = None
        self.clock = clock
        self.retired = Retired()  # the last counters of every replica forgotten: the totals stay monotonic

    @property
    def token(self) -> str:
        return f"{self.epoch}:{self.seq}"

    def set(self, record: dict[str, Any]) -> str:
        record = {k: record[k] for k in RECORD_KEYS if k in record}
        if "version" not in record:
            raise ValueError(f"a promoted record needs at least a 'version'; got {sorted(record)}")
        if record != self.record:
            self.record, self.seq = record, self.seq + 1
        return self.token

    def snapshot(self) -> dict[str, Any]:
        return {"token": self.token, "record": self.record}

    def report(self, replica_id: str, state: dict[str, Any]) -> None:
        now = self.clock()
        state = {**state, "metrics": clean(state.get("metrics"))}  # only known labels and shapes are ever summed
        retired = self.retired.take(replica_id)
        if retired is not None:  # heard from after it was forgotten (a late heartbeat): counted once, never less than before
            state["metrics"] = newest(retired, state["metrics"])
        self.replicas[replica_id] = {**state, "replica_id": replica_id, "seen_unix": now}
        for rid in [r for r, s in self.replicas.items() if now - s["seen_unix"] > FORGET_S]:
            self.retired.add(rid, self.replicas.pop(rid).get("metrics"))

    def forget(self, replica_id: str, last: dict[str, Any] | None = None) -> None:
        """Drop a replica; its counters (``last``: the final ones it sends as it stops) move to ``retired``."""
        state = self.replicas.pop(replica_id, None)
        known = [m for m in (self.retired.take(replica_id), (state or {}).get("metrics"), None if last is None else clean(last)) if isinstance(m, dict)]
        if known:  # snapshots of one replica's cumulative counters: the newest is the largest
            self.retired.add(replica_id, functools.reduce(newest, known))

    def live(self) -> list[dict[str, Any]]:
        """The replicas heard from in the last FRESH_S, as they reported (without their counters: see ``metrics``)."""
        now = self.clock()
        return [{**{k: v for k, v in r.items() if k != "metrics"}, "age_s": round(now - r["seen_unix"], 3)}
                for r in self.replicas.values() if now - r["seen_unix"] <= FRESH_S]

    def metrics(self) -> dict[str, Any]:
        """Serving's counters summed over every replica known and retired, and gauges of the live replicas."""
        counters = merge(empty(), self.retired.total)
        for replica in self.replicas.values():
            merge(counters, replica.get("metrics"))
        states = dict.fromkeys(REPLICA_STATES, 0)
        live = self.live()
        for replica in live:
            states[replica_state(replica, self.record)] += 1
        versions = [r["version"] for r in live if isinstance(r.get("version"), int) and not isinstance(r.get("version"), bool)]
        return {"counters": counters, "replicas": states, "promoted_version": None if self.record is None else self.record["version"],
                "lowest_version": min(versions, default=None), "known": len(self.replicas)}

    def progress(self, version: int, sha: str | None, want: int) -> dict[str, Any]:
        """``ok`` when ``want`` live replicas hold the record; ``error`` when a live one reports it cannot load it."""
        live = self.live()
        on = [r for r in live if holds(r, version, sha)]
        failed = [r for r in live if r.get("error") and holds(r["error"], version, sha)]
        state = "error" if failed else "ok" if len(on) >= want else "waiting"
        return {"state": state, "on": len(on), "want": want, "replicas": live,
                "error": f"replica {failed[0]['replica_id']}: {failed[0]['error'].get('message')}" if failed else None}

    def running_config(self) -> str | None:
        """The config sha the daemon deployed, or the one every live replica reports (after a registry restart)."""
        reported = {r.get("config_sha") for r in self.live()}
        return self.deployed_sha or (reported.pop() if len(reported) == 1 else None)


def read_served(store_url: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The promoted record in SERVED.json; None when there is none yet or it cannot be read now (logged)."""
    from everlearn.learners.checkpoints import CheckpointStore

    try:
        doc = json.loads(CheckpointStore(store_url, storage_options, timeout_s=10.0).read_root(SERVED))
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 unreachable store or a torn file: the daemon's set() or the next read fixes it
        log.warning("cannot read %s/%s: %s", store_url, SERVED, e)
        return None
    return doc if isinstance(doc, dict) and "version" in doc else None


class ServingRegistry:
    """The Ray actor (async: a long-poll waits without holding a thread). Created by ``registry_actor``."""

    def __init__(self, store_url: str, storage_options: dict[str, Any] | None = None):
        self.store_url, self.storage_options = store_url, storage_options or {}
        self.state = RegistryState()
        self.changed = asyncio.Condition()
        self._read_at = time.monotonic()
        served = read_served(self.store_url, self.storage_options)
        if served is not None:
            self.state.set(served)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def describe(self) -> dict[str, Any]:
        return {"store_url": self.store_url, **self.state.snapshot(), "replicas": self.state.live(), "deployed_sha": self.state.deployed_sha}

    async def set(self, record: dict[str, Any]) -> str:
        token = self.state.set(record)
        await self._notify()
        return token

    async def deployed(self, config_sha: str) -> None:
        self.state.deployed_sha = config_sha

    async def running_config(self) -> str | None:
        return self.state.running_config()

    async def current(self) -> dict[str, Any]:
        if self.state.record is None and time.monotonic() - self._read_at > REREAD_S:  # the store was away at start
            self._read_at = time.monotonic()
            served = await asyncio.to_thread(read_served, self.store_url, self.storage_options)
            if served is not None and self.state.record is None:
                await self.set(served)
        return self.state.snapshot()

    async def watch(self, known: str | None, timeout_s: float) -> dict[str, Any]:
        """The record once its token differs from ``known``, or after ``timeout_s`` (the replica's heartbeat)."""
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: self.state.token != known), timeout_s)
        return await self.current()

    async def report(self, replica_id: str, state: dict[str, Any]) -> None:
        self.state.report(replica_id, state)
        await self._notify()

    async def forget(self, replica_id: str, last: dict[str, Any] | None = None) -> None:
        self.state.forget(replica_id, last)
        await self._notify()

    async def metrics(self) -> dict[str, Any]:
        return self.state.metrics()

    async def wait_for(self, version: int, sha: str | None, want: int, timeout_s: float) -> dict[str, Any]:
        """Progress of a swap to (version, sha), once it is decided (ok or error) or after ``timeout_s``."""
        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(lambda: self.state.progress(version, sha, want)["state"] != "waiting"),
                                       timeout_s)
        return self.state.progress(version, sha, want)


class MemoryRegistry:
    """An in-process double of the actor as replicas see it (``current``, ``watch``, ``report``, ``forget``, ``metrics``): unit tests."""

    def __init__(self, record: dict[str, Any] | None = None):
        self.state = RegistryState()
        self.changed = threading.Condition()
        if record is not None:
            self.set(record)

    def set(self, record: dict[str, Any]) -> str:
        with self.changed:
            token = self.state.set(record)
            self.changed.notify_all()
        return token

    def current(self) -> dict[str, Any]:
        return self.state.snapshot()

    def watch(self, known: str | None, timeout_s: float) -> dict[str, Any]:
        with self.changed:
            self.changed.wait_for(lambda: self.state.token != known, timeout_s)
            return self.state.snapshot()

    def report(self, replica_id: str, state: dict[str, Any]) -> None:
        with self.changed:
            self.state.report(replica_id, state)
            self.changed.notify_all()

    def forget(self, replica_id: str, last: dict[str, Any] | None = None) -> None:
        with self.changed:
            self.state.forget(replica_id, last)

    def metrics(self) -> dict[str, Any]:
        with self.changed:
            return self.state.metrics()


class ActorRegistry:
    """The registry actor as a replica calls it: blocking calls from the replica's watcher thread, found by name."""

    def __init__(self, name: str, namespace: str = NAMESPACE, call_timeout_s: float = 30.0):
        self.name, self.namespace, self.call_timeout_s = name, namespace, call_timeout_s
        self._handle = None

    def _call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        import ray

        if self._handle is None:  # looked up again after a failure: the actor may have been replaced
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        try:
            return ray.get(getattr(self._handle, method).remote(*args), timeout=timeout_s or self.call_timeout_s)
        except Exception:
            self._handle = None
            raise

    def current(self) -> dict[str, Any]:
        return self._call("current")

    def watch(self, known: str | None, timeout_s: float) -> dict[str, Any]:
        return self._call("watch", known, timeout_s, timeout_s=timeout_s + self.call_timeout_s)

    def report(self, replica_id: str, state: dict[str, Any]) -> None:
        self._call("report", replica_id, state)

    def forget(self, replica_id: str, last: dict[str, Any] | None = None) -> None:
        self._call("forget", replica_id, last, timeout_s=5.0)  # at shutdown: do not hold the replica's exit

    def metrics(self, timeout_s: float = 5.0) -> dict[str, Any]:
        return self._call("metrics", timeout_s=timeout_s)  # a scrape: answer 503 rather than outlast its timeout


def registry_actor(app_name: str, store_url: str, storage_options: dict[str, Any] | None = None):
    """The application's registry actor, created if absent; one left by a run on another store is replaced.

    Detached and restarted forever: it outlives the daemon, and on a restart it reads SERVED.json.
    """
    import ray

    options = {"name": registry_name(app_name), "namespace": NAMESPACE, "lifetime": "detached", "get_if_exists": True,
               "max_restarts": -1, "max_task_retries": -1, "num_cpus": 0}
    actor_class = ray.remote(ServingRegistry)
    handle = actor_class.options(**options).remote(store_url, storage_options or {})
    if ray.get(handle.describe.remote(), timeout=60)["store_url"] != store_url:  # the app name was reused by another run
        ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ray.get_actor(options["name"], namespace=NAMESPACE)
                time.sleep(0.1)
            except ValueError:
                break
        handle = actor_class.options(**options).remote(store_url, storage_options or {})
    return handle
