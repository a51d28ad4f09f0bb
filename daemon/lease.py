"""One writer per run: a lease on the run directory and on the checkpoint store.

Two daemons writing one run would interleave checkpoints and promotions, so
the second one refuses to start, naming the first.

* Local directories (the run directory, a local checkpoint store): an exclusive
  ``flock`` on ``.everlearn.lock``. The kernel drops it when the process dies,
  however it dies, so a restart after ``kill -9`` never waits.
* Object stores: a ``LEASE`` object created with a conditional write
  (If-None-Match); the holder renews it every third of ``ttl_s`` (If-Match on
  the ETag it wrote). A lease whose holder stopped renewing expires after
  ``ttl_s``, or at once when its holder was this host's process that is gone.
  A holder that finds its lease taken stops writing (``lost`` is set).
"""

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from everlearn.errors import RunLockedError
from everlearn.learners import CheckpointStore

LOCK_FILE = ".everlearn.lock"
LEASE = "LEASE"


def _owner(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since_unix": round(time.time(), 3), **(extra or {})}


class DirectoryLock:
    """An exclusive, non-blocking flock on ``directory/.everlearn.lock`` for the life of this process."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another everlearn daemon ({holder}); "
                "stop that daemon first, or give this one another run_dir / checkpoint.url"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None


def _precondition_failed(e: BaseException | None) -> bool:
    """Whether a conditional write was refused (HTTP 412), however the filesystem reports it: s3fs raises
    FileExistsError for If-None-Match only when the server names the condition, else a plain
    ``OSError(EINVAL)`` whose cause is the botocore ClientError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FileExistsError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict) and (response.get("Error", {}).get("Code") == "PreconditionFailed"
                                           or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412):
            return True
        e = e.__cause__
    return False


class StoreLease:
    """A renewed lease object in an object store (see the module docstring)."""

    def __init__(self, store: CheckpointStore, ttl_s: float, clock=time.time):
        self.store, self.ttl_s, self.clock = store, ttl_s, clock
        self.path = f"{store.root}/{LEASE}"
        self.owner = uuid.uuid4().hex
        self.lost: str | None = None  # why the lease was lost, once it is
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(_owner({"owner": self.owner, "expires_unix": round(self.clock() + self.ttl_s, 3)})).encode()

    def _etag_of(self) -> str | None:
        self.store.fs.invalidate_cache(self.path)
        info = self.store.fs.info(self.path)
        return info.get("ETag") or info.get("etag")

    def _read(self) -> tuple[dict[str, Any], str | None]:
        """The holder and the ETag of a version no newer than it: the ETag is read first, so a write
        conditioned on it fails if the lease changed after it, never overwrites a holder not read."""
        etag = self._etag_of()
        self.store.fs.invalidate_cache(self.path)
        try:
            holder = json.loads(self.store.fs.cat_file(self.path))
        except ValueError:
            holder = {}
        return holder, etag

    def _write(self, if_match: str | None, create: bool = False) -> None:
        """Create the lease (fails if it exists), or replace the version ``if_match`` names (fails if it changed).

        A store without ETags (memory://) replaces it unconditionally: last writer wins.
        """
        if create:
            out = self.store.fs.pipe_file(self.path, self._body(), mode="create")
        elif if_match is not None:
            out = self.store.fs.pipe_file(self.path, self._body(), IfMatch=if_match)
        else:
            out = self.store.fs.pipe_file(self.path, self._body())
        self._etag = out.get("ETag") if isinstance(out, dict) else None

    def _locked(self, holder: dict[str, Any]) -> RunLockedError:
        return RunLockedError(
            f"checkpoint store {self.store.url} is leased by another everlearn daemon "
            f"(host {holder.get('host')}, pid {holder.get('pid')}, until unix {holder.get('expires_unix')}); "
            f"stop it, or wait {self.ttl_s:.0f} s after it died, or use another checkpoint.url"
        )

    def acquire(self) -> None:
        self._stop.clear()  # a lease acquired again after release() renews again
        self.lost = None
        self.store.fs.makedirs(self.store.root, exist_ok=True)
        for _ in range(3):  # the lease may be released between a refused create and the read
            try:
                self._write(None, create=True)
                break
            except OSError as e:
                if not _precondition_failed(e):
                    raise
            try:
                holder, etag = self._read()
            except FileNotFoundError:
                continue
            if not self._expired(holder):
                raise self._locked(holder) from None
            try:
                self._write(etag)  # take over: fails if someone else did in between
                break
            except OSError as e:
                if not _precondition_failed(e):
                    raise
                raise self._locked(self._read()[0]) from None
        else:
            raise RunLockedError(f"checkpoint store {self.store.url}: its lease keeps changing hands; another everlearn "
                                 "daemon is starting on it: stop it, or use another checkpoint.url")
        self._thread = threading.Thread(target=self._renew_loop, name="everlearn-lease", daemon=True)
        self._thread.start()

    def _expired(self, holder: dict[str, Any]) -> bool:
        if float(holder.get("expires_unix", 0)) < self.clock():
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # its holder on this machine is gone
            except PermissionError:
                return False
        return False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                holder, etag = self._read()
                if holder.get("owner") != self.owner:
                    self.lost = f"the lease on {self.store.url} was taken by host {holder.get('host')} pid {holder.get('pid')}"
                    return
                self._write(etag)
            except Exception:  # noqa: BLE001 an outage: keep trying; the lease lasts ttl_s meanwhile
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            holder, _ = self._read()
            if holder.get("owner") == self.owner:
                self.store.fs.rm(self.path)


class RunLease:
    """The run directory's lock, plus the checkpoint store's lock (local) or lease (object store)."""

    def __init__(self, run_dir: str | Path, store: CheckpointStore, ttl_s: float = 30.0):
        self.parts: list[DirectoryLock | StoreLease] = [DirectoryLock(run_dir)]
        if store.local:
            if Path(store.root).resolve() != Path(run_dir).resolve():
                self.parts.append(DirectoryLock(store.root))
        else:
            self.parts.append(StoreLease(store, ttl_s))

    @property
    def lost(self) -> str | None:
        return next((p.lost for p in self.parts if isinstance(p, StoreLease) and p.lost), None)

    def acquire(self) -> "RunLease":
        taken = []
        try:
            for part in self.parts:
                part.acquire()
                taken.append(part)
        except BaseException:
            for part in taken:
                part.release()
            raise
        return self

    def release(self) -> None:
        for part in reversed(self.parts):
            part.release()
