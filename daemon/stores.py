"""The ``Store`` a DirectorySource lists and reads through, and ``make_store``, which picks one per filesystem.

- ``LocalStore`` (daemon/store_local.py) for ``file://``;
- ``S3Store`` (daemon/store_s3.py) for ``s3://`` through s3fs's client;
- ``FsspecStore`` (daemon/store_fsspec.py) for anything else, e.g. ``memory://``.
"""

from collections.abc import Iterable
from typing import Protocol

from fsspec.implementations.local import LocalFileSystem

from everlearn.daemon.listing import Listing, Stat
from everlearn.daemon.store_fsspec import FsspecStore
from everlearn.daemon.store_local import LocalStore
from everlearn.daemon.store_s3 import S3Store


class Reader(Protocol):
    """One file as the listing saw it; a context manager. ``head``: what a read from byte 0 returned."""

    head: bytes

    def seek(self, pos: int) -> None: ...

    def read(self, n: int) -> bytes: ...


class Store(Protocol):
    id_is_content: bool  # the identity is a hash of the content (an ETag): equal ids need no read to compare

    def list(self, after: dict[str, str], tracked: set[str]) -> Listing: ...

    def stat(self, rels: Iterable[str]) -> dict[str, Stat]: ...

    def open(self, s: Stat) -> Reader: ...


def make_store(fs, root: str) -> Store:
    if isinstance(fs, LocalFileSystem):
        return LocalStore(fs, root)
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if hasattr(fs, "call_s3") and {"s3", "s3a"} & set(protocols):
        return S3Store(fs, root)
    return FsspecStore(fs, root)
