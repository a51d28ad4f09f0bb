"""What a store's listing says about a DirectorySource's files, and the helpers every store shares.

A store (daemon/stores.py picks one per URL: daemon/store_local.py, store_s3.py,
store_fsspec.py) lists the stream's files as ``Stat``s in a ``Listing`` and reads
them; this module holds that shared vocabulary so the stores and the source
(daemon/sources.py) depend on it, not on each other.

Names are relative paths (``law/a.jsonl``); a file's directory is its top-level directory
(``law``, or ``""`` at the root). Reads never go past the size the listing reported.
A name ending in ``.gz`` or ``.zst`` (``a.jsonl.gz``) is a compressed file: its sizes
are of the compressed bytes.
"""

import bisect
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

COMPRESSIONS = (".gz", ".zst")  # decompressed while read: daemon/source_compression.py
SUFFIXES = tuple(kind + c for kind in (".jsonl", ".txt") for c in ("",) + COMPRESSIONS)
_LONGEST_FIRST = sorted(SUFFIXES, key=len, reverse=True)
_TXT = tuple(s for s in SUFFIXES if s.startswith(".txt"))
FP_MAX = 4096  # bytes of a file's head that identify its content (a hash of them)


@dataclass(frozen=True)
class Stat:
    rel: str
    size: int
    sig: tuple  # changes whenever the content may have changed: (size, mtime[, etag])
    ts: float | None  # when the store says it last changed, seconds since the epoch
    id: str | None  # local: "dev:ino" (kept across renames and appends); s3: the ETag (a content hash); None: unknown


@dataclass
class Listing:
    stats: dict[str, Stat]  # names after their directory's watermark, and the tracked names that exist
    below: dict[str, list[str]] | None  # per directory, sorted names at or below its watermark; None: not listed (s3)
    dirs: set[str]  # top-level directories seen


class Changed(Exception):
    """The file changed or went away between the listing and the read; look again at the next poll."""


def top(rel: str) -> str:
    return rel.split("/", 1)[0] if "/" in rel else ""


def is_stream_name(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(SUFFIXES) and not name.startswith(".")


def is_compressed(rel: str) -> bool:
    return rel.endswith(COMPRESSIONS)


def is_txt(rel: str) -> bool:
    """A whole-file document (``.txt``, compressed or not); the rest are ``.jsonl``."""
    return rel.endswith(_TXT)


def suffix(rel: str) -> str:
    """The stream suffix the name ends with (``.jsonl.gz``, ``.txt``, ...): what a file is and how it is read."""
    return next((s for s in _LONGEST_FIRST if rel.endswith(s)), "")


def fingerprint(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def digest(names: list[str]) -> str:
    """One short hash of a sorted list of names: tells whether the set changed without keeping it."""
    return hashlib.blake2b("\0".join(names).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest() if names else ""


def seconds(value: Any) -> float | None:
    """A store's modification time (a datetime or a number) as seconds since the epoch; None if it is neither."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


class Bounded:
    """A file object read at most up to ``size`` (what the listing saw): bytes appended since wait for the next poll."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0
        self.head = b""  # what a read from byte 0 returned: saves reading it again for the fingerprint

    def seek(self, pos: int) -> None:
        self.pos = pos
        self.f.seek(pos)

    def read(self, n: int) -> bytes:
        n = min(n, self.size - self.pos)
        if n <= 0:
            return b""
        data = self.f.read(n)
        if self.pos == 0:
            self.head = data
        self.pos += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def split(names_by_dir: dict[str, list[str]], after: dict[str, str], tracked: set[str]):
    """Per directory: (sorted names at or below the watermark, names to look at: after it, or tracked)."""
    below, wanted = {}, []
    for d, names in names_by_dir.items():
        names.sort()
        i = bisect.bisect_right(names, after[d]) if after.get(d) else 0
        below[d] = names[:i]
        wanted += [n for n in names[:i] if n in tracked] + names[i:]
    return below, wanted
