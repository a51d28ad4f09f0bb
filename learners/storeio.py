"""Bounded, classified storage calls on any fsspec filesystem: what the checkpoint store is built on.

Every call is bounded in time (``timeout_s`` plus a second per ``mb_per_s`` MiB
sent): a blackholed connection, accepted and never answered, would otherwise
hold a write forever. A failure that retrying may cure (timeouts, resets, 5xx)
becomes ``StorageUnavailable``; a missing file stays ``FileNotFoundError``.
Three writes that partial failures must not tear: an exclusive create (the
manifest), a whole replace (LATEST, SERVED.json) and a directory move (setting
a damaged checkpoint aside).
"""

import contextlib
import os
from typing import Any

import fsspec
import fsspec.asyn

from everlearn.errors import StorageUnavailable
from everlearn.retry import is_transient


class StoreIO:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, timeout_s: float = 60.0, mb_per_s: float = 8.0):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.timeout_s, self.mb_per_s = timeout_s, mb_per_s
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.protocol = protocol
        self.local = protocol in ("file", "local")

    def call(self, what: str, method: str, *args, **kwargs):
        """One storage call, bounded in time; a transient failure becomes StorageUnavailable (the caller retries).

        The bound is ``timeout_s`` plus a second per ``mb_per_s`` MiB sent: a blackholed
        connection (accepted, never answered) would otherwise hold a write forever.
        """
        size = next((len(a) for a in args if isinstance(a, bytes | bytearray)), 0)
        timeout = self.timeout_s + size / (self.mb_per_s * 2**20)
        try:
            if getattr(self.fs, "async_impl", False) and hasattr(self.fs, f"_{method}"):
                return fsspec.asyn.sync(self.fs.loop, getattr(self.fs, f"_{method}"), *args, timeout=timeout, **kwargs)
            return getattr(self.fs, method)(*args, **kwargs)
        except (FileNotFoundError, FileExistsError):
            raise
        except Exception as e:
            if is_transient(e):
                raise StorageUnavailable(f"checkpoint store {self.url} did not answer ({what}): {type(e).__name__}: {e}") from e
            raise

    def create(self, path: str, data: bytes) -> None:
        """Write ``path`` only if it does not exist, all at once (FileExistsError otherwise)."""
        if not self.local:  # object stores: a conditional create (If-None-Match: *)
            try:
                self.call("create manifest", "pipe_file", path, data, mode="create")
            except OSError as e:
                if "PreconditionFailed" in str(e) or "412" in str(e):
                    raise FileExistsError(path) from e
                raise
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive: a complete file or none
        finally:
            os.unlink(tmp)

    def replace(self, path: str, data: bytes) -> None:
        """A reader sees the old bytes or the new, never a mix: an object store's PUT already is whole."""
        if not self.local:
            self.call("write", "pipe_file", path, data)
            return
        tmp = f"{path}.tmp"
        self.call("write", "pipe_file", tmp, data)
        self.call("rename", "mv", tmp, path)

    def move(self, src: str, dst: str) -> None:
        """Move a directory: a rename on local disks; elsewhere each file copied, then deleted.

        An object store has no directories to rename, and a recursive ``mv`` there copies the
        keys of a listing, which after an interrupted write may name a key that is not there.
        """
        if self.local:
            self.call("move aside", "mv", src, dst, recursive=True)
            return
        self.fs.invalidate_cache()
        files = self.call("list", "find", src)
        prefix = src.strip("/") + "/"
        for path in files:
            self.call("copy aside", "cp_file", path, f"{dst}/{path.strip('/')[len(prefix):]}")
        for path in files:
            self.call("delete", "rm_file", path)
        self.fs.invalidate_cache()
        with contextlib.suppress(FileNotFoundError):  # what is left of it: an empty directory, where there are such
            if self.call("exists", "exists", src):
                self.call("delete", "rm", src, recursive=True)
