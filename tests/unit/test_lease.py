"""One writer per run (daemon/lease.py): the directory lock across processes, the run lease, the store lease's logic.

The other processes run a few lines of Python that load daemon/lease.py by its path with
``everlearn.learners`` stubbed: DirectoryLock needs none of it, and importing it (torch)
would cost each process ~10 s on 2 cores.
"""

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from everlearn.daemon import lease as lease_module
from everlearn.daemon.lease import LEASE, LOCK_FILE, DirectoryLock, RunLease, StoreLease
from everlearn.errors import RunLockedError
from everlearn.learners import CheckpointStore

pytestmark = pytest.mark.unit

PRELUDE = f"""
import importlib.util, json, os, select, subprocess, sys, types
learners = types.ModuleType("everlearn.learners")
learners.CheckpointStore = object
sys.modules["everlearn.learners"] = learners
spec = importlib.util.spec_from_file_location("lease", {lease_module.__file__!r})
lease = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lease)
"""

# argv: directory [spawn-a-child]; prints {"pid", "child"} once locked, holds until stdin closes (30 s at most)
HOLD = PRELUDE + """
lock = lease.DirectoryLock(sys.argv[1])
lock.acquire()
child = subprocess.Popen(["sleep", "30"], close_fds=False) if len(sys.argv) > 2 else None
print(json.dumps({"pid": os.getpid(), "child": child.pid if child else None}), flush=True)
select.select([sys.stdin], [], [], 30)
"""

# argv: directories; tries each and prints one JSON line per directory: "acquired" or the error
TRY = PRELUDE + """
for d in sys.argv[1:]:
    try:
        lease.DirectoryLock(d).acquire()
        print(json.dumps([d, "acquired"]))
    except Exception as e:
        print(json.dumps([d, type(e).__name__, str(e)]))
"""


@pytest.fixture
def procs():
    """Processes a test starts (and pids they start): each killed by pid at the end."""
    started: list[subprocess.Popen] = []
    pids: list[int] = []
    yield started, pids
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for pipe in (p.stdin, p.stdout):
            if pipe is not None:
                pipe.close()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def hold(procs, directory: Path, spawn_child: bool = False) -> tuple[subprocess.Popen, dict]:
    started, pids = procs
    args = [sys.executable, "-c", HOLD, str(directory)] + (["child"] if spawn_child else [])
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    started.append(p)
    ready, _, _ = select.select([p.stdout], [], [], 30)
    assert ready, "the holder did not take the lock within 30 s"
    info = json.loads(p.stdout.readline())
    if info["child"]:
        pids.append(info["child"])
    return p, info


def try_lock(*directories: Path) -> dict[str, list]:
    out = subprocess.run([sys.executable, "-c", TRY, *map(str, directories)], capture_output=True, text=True,
                         timeout=60, check=True)
    return {line[0]: line[1:] for line in map(json.loads, out.stdout.splitlines())}


# -- DirectoryLock -----------------------------------------------------------

def test_another_process_holding_the_lock_refuses_it_naming_its_pid(tmp_path, procs):
    holder, info = hold(procs, tmp_path)
    lock = DirectoryLock(tmp_path)
    with pytest.raises(RunLockedError) as err:
        lock.acquire()
    msg = str(err.value)
    assert f'"pid": {info["pid"]}' in msg and str(tmp_path) in msg and socket.gethostname() in msg
    assert "stop that daemon first" in msg
    assert lock._fd is None  # nothing half-taken


def test_the_lock_is_free_at_once_after_its_holder_is_sigkilled(tmp_path, procs):
    holder, _ = hold(procs, tmp_path)
    with pytest.raises(RunLockedError):
        DirectoryLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    lock = DirectoryLock(tmp_path)
    lock.acquire()  # no wait, no stale-lock cleanup
    try:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_child_of_the_holder_does_not_inherit_the_lock(tmp_path, procs):
    holder, info = hold(procs, tmp_path, spawn_child=True)
    child = info["child"]
    lock_file = str((tmp_path / LOCK_FILE).resolve())
    fds = []
    for fd in os.listdir(f"/proc/{child}/fd"):
        with contextlib.suppress(FileNotFoundError):  # an fd the child closed meanwhile
            fds.append(os.readlink(f"/proc/{child}/fd/{fd}"))
    assert fds and lock_file not in fds
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    os.kill(child, 0)  # the child still runs ...
    lock = DirectoryLock(tmp_path)
    lock.acquire()  # ... and does not keep the lock
    lock.release()


def test_a_lock_held_here_refuses_another_process_until_released(tmp_path):
    lock = DirectoryLock(tmp_path / "run")  # the directory is created
    lock.acquire()
    try:
        got = try_lock(tmp_path / "run")[str(tmp_path / "run")]
        assert got[0] == "RunLockedError" and f'"pid": {os.getpid()}' in got[1]
    finally:
        lock.release()
    assert try_lock(tmp_path / "run")[str(tmp_path / "run")] == ["acquired"]


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    first = DirectoryLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(RunLockedError):
            DirectoryLock(tmp_path).acquire()
    finally:
        first.release()
    first.release()  # twice is fine
    again = DirectoryLock(tmp_path)
    again.acquire()
    again.release()


# -- RunLease with a local store -----------------------------------------------

def test_run_lease_locks_the_run_dir_and_a_local_store_elsewhere(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "elsewhere" / "ckpt"
    lease = RunLease(run, CheckpointStore(str(ckpt)))
    assert [type(p) for p in lease.parts] == [DirectoryLock, DirectoryLock]
    lease.acquire()
    try:
        got = try_lock(run, ckpt)
        assert got[str(run)][0] == got[str(ckpt)][0] == "RunLockedError"
        assert lease.lost is None
    finally:
        lease.release()
    assert try_lock(run, ckpt) == {str(run): ["acquired"], str(ckpt): ["acquired"]}


def test_run_lease_on_a_store_that_is_the_run_dir_takes_one_lock(tmp_path):
    lease = RunLease(tmp_path, CheckpointStore(f"file://{tmp_path}"))
    assert len(lease.parts) == 1
    lease.acquire().release()


def test_run_lease_releases_what_it_took_when_a_later_part_is_held(tmp_path, procs):
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    hold(procs, ckpt)
    with pytest.raises(RunLockedError, match="ckpt"):
        RunLease(run, CheckpointStore(str(ckpt))).acquire()
    lock = DirectoryLock(run)  # the run dir's lock was given back
    lock.acquire()
    lock.release()


# -- StoreLease on memory:// (the logic; tests/integration/test_lease_s3.py runs it on S3) ----

class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class _NoRenewals:
    """In place of a lease's stop event: the renew thread ends at once; ``renew_once`` runs one renewal."""

    def __init__(self, renewals: int = 0):
        self.renewals = renewals

    def wait(self, timeout=None) -> bool:
        self.renewals -= 1
        return self.renewals < 0

    def set(self) -> None:
        self.renewals = 0

    def clear(self) -> None:
        pass


def manual(store: CheckpointStore, clock: Clock, ttl_s: float = 30.0) -> StoreLease:
    lease = StoreLease(store, ttl_s, clock=clock)
    lease._stop = _NoRenewals()
    return lease


def renew_once(lease: StoreLease) -> None:
    lease._stop = _NoRenewals(1)
    lease._renew_loop()


@pytest.fixture
def store():
    s = CheckpointStore(f"memory://lease-{uuid.uuid4().hex}")
    yield s
    if s.fs.exists(s.root):
        s.fs.rm(s.root, recursive=True)


def holder(store: CheckpointStore) -> dict:
    return json.loads(store.fs.cat_file(f"{store.root}/{LEASE}"))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait(10)
    return p.pid


def test_acquire_writes_who_holds_the_lease_and_until_when(store):
    clock = Clock()
    a = manual(store, clock, ttl_s=30)
    a.acquire()
    h = holder(store)
    assert h["owner"] == a.owner and h["pid"] == os.getpid() and h["host"] == socket.gethostname()
    assert h["expires_unix"] == pytest.approx(clock.t + 30)
    a.release()


def test_a_live_holder_refuses_a_second_lease(store):
    clock = Clock()
    a = manual(store, clock)
    a.acquire()
    before = holder(store)
    with pytest.raises(RunLockedError, match=rf"leased by another everlearn daemon \(host {socket.gethostname()}, pid {os.getpid()}"):
        manual(store, clock).acquire()
    assert holder(store) == before
    clock.t += 29  # not expired yet
    with pytest.raises(RunLockedError):
        manual(store, clock).acquire()
    a.release()


def test_an_expired_lease_is_taken_over_and_its_holder_finds_it_lost(store):
    clock = Clock()
    a, b = manual(store, clock), manual(store, clock)
    a.acquire()
    clock.t += 31  # a stopped renewing
    b.acquire()
    assert holder(store)["owner"] == b.owner
    assert a.lost is None
    renew_once(a)
    assert a.lost and "was taken by host" in a.lost and f"pid {os.getpid()}" in a.lost
    assert holder(store)["owner"] == b.owner  # a noticed, and did not write
    renew_once(b)
    assert b.lost is None and holder(store)["owner"] == b.owner


def test_renewal_extends_the_lease(store):
    clock = Clock()
    a = manual(store, clock)
    a.acquire()
    clock.t += 20
    renew_once(a)
    assert holder(store)["expires_unix"] == pytest.approx(clock.t + 30)
    clock.t += 20  # 40 s after acquiring, 20 after the renewal: still held
    with pytest.raises(RunLockedError):
        manual(store, clock).acquire()
    a.release()


def test_the_renew_thread_renews_in_the_background(store):
    clock = Clock()
    a = StoreLease(store, ttl_s=0.3, clock=clock)  # renews every 0.1 s
    a.acquire()
    try:
        clock.t += 1000
        deadline = time.monotonic() + 5
        while holder(store)["expires_unix"] < clock.t and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(store)["expires_unix"] == pytest.approx(clock.t + 0.3)
    finally:
        a.release()
    assert not a._thread.is_alive()
    assert not store.fs.exists(a.path)


def test_a_lease_acquired_again_after_release_renews_again(store):
    clock = Clock()
    a = StoreLease(store, ttl_s=0.3, clock=clock)
    a.acquire()
    a.release()
    a.acquire()
    try:
        clock.t += 1000
        deadline = time.monotonic() + 5
        while holder(store)["expires_unix"] < clock.t and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(store)["expires_unix"] == pytest.approx(clock.t + 0.3)
    finally:
        a.release()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once(store):
    clock = Clock()
    body = {"host": socket.gethostname(), "pid": dead_pid(), "owner": "crashed", "expires_unix": clock.t + 1000}
    store.fs.pipe_file(f"{store.root}/{LEASE}", json.dumps(body).encode())
    b = manual(store, clock)
    b.acquire()
    assert holder(store)["owner"] == b.owner
    b.release()


def test_a_lease_of_a_live_process_on_this_host_is_not_taken(store, procs):
    started, _ = procs
    sleeper = subprocess.Popen(["sleep", "30"])
    started.append(sleeper)
    clock = Clock()
    body = {"host": socket.gethostname(), "pid": sleeper.pid, "owner": "alive", "expires_unix": clock.t + 1000}
    store.fs.pipe_file(f"{store.root}/{LEASE}", json.dumps(body).encode())
    with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
        manual(store, clock).acquire()


def test_a_lease_of_another_host_waits_for_expiry_whatever_its_pid(store):
    clock = Clock()
    body = {"host": "some-other-host", "pid": dead_pid(), "owner": "remote", "expires_unix": clock.t + 10}
    store.fs.pipe_file(f"{store.root}/{LEASE}", json.dumps(body).encode())
    with pytest.raises(RunLockedError, match="host some-other-host"):
        manual(store, clock).acquire()
    clock.t += 11
    b = manual(store, clock)
    b.acquire()
    assert holder(store)["owner"] == b.owner


def test_an_unreadable_lease_is_taken_over(store):
    store.fs.pipe_file(f"{store.root}/{LEASE}", b"{torn")
    b = manual(store, Clock())
    b.acquire()
    assert holder(store)["owner"] == b.owner


def test_release_removes_only_its_own_lease(store):
    clock = Clock()
    a, b = manual(store, clock), manual(store, clock)
    a.acquire()
    clock.t += 31
    b.acquire()
    a.release()
    assert holder(store)["owner"] == b.owner  # a's release left b's lease alone
    b.release()
    assert not store.fs.exists(f"{store.root}/{LEASE}")
    c = manual(store, clock)
    c.acquire()  # free again
    c.release()


def test_run_lease_on_an_object_store_reports_a_lost_lease(tmp_path, store):
    clock = Clock()
    run = RunLease(tmp_path / "run", store)
    assert [type(p) for p in run.parts] == [DirectoryLock, StoreLease]
    mine = run.parts[1]
    mine.clock, mine._stop = clock, _NoRenewals()
    run.acquire()
    try:
        clock.t += 1000
        other = manual(store, clock)
        other.acquire()
        renew_once(mine)
        assert run.lost == mine.lost and "was taken" in run.lost
    finally:
        run.release()
    assert holder(store)["owner"] == other.owner
