"""Listing and reading a DirectorySource's files, one way per kind of store.

``make_store(fs, root)`` picks one:

- ``LocalStore`` (``file://``): ``os.scandir`` for names, ``os.stat`` only for names after
  their directory's watermark and for files still open; identity ``st_dev:st_ino``.
- ``S3Store`` (``s3://``): ``list_objects_v2`` through s3fs's client, starting after the
  watermark of each top-level prefix (finished objects are not even listed); reads are
  ranged GETs with ``If-Match`` on the listed ETag. s3fs's listing cache is never used, so
  objects uploaded by another client are seen at the next poll.
- ``FsspecStore`` (anything else, e.g. ``memory://``): ``find`` with the cache invalidated.

Names are relative paths (``law/a.jsonl``); a file's directory is its top-level directory
(``law``, or ``""`` at the root). Reads never go past the size the listing reported.
"""

import bisect
import errno
import hashlib
import os
import stat as stat_mod
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

SUFFIXES = (".jsonl", ".txt")
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


def fingerprint(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def digest(names: list[str]) -> str:
    """One short hash of a sorted list of names: tells whether the set changed without keeping it."""
    return hashlib.blake2b("\0".join(names).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest() if names else ""


def _seconds(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


class _Bounded:
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


def _split(names_by_dir: dict[str, list[str]], after: dict[str, str], tracked: set[str]):
    """Per directory: (sorted names at or below the watermark, names to look at: after it, or tracked)."""
    below, wanted = {}, []
    for d, names in names_by_dir.items():
        names.sort()
        i = bisect.bisect_right(names, after[d]) if after.get(d) else 0
        below[d] = names[:i]
        wanted += [n for n in names[:i] if n in tracked] + names[i:]
    return below, wanted


class LocalStore:
    id_is_content = False

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root

    def _names(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        stack = [(self.root, "")]
        while stack:
            path, prefix = stack.pop()
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue  # the root is missing (an empty stream), or a directory went away meanwhile
            for entry in entries:
                rel = prefix + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not prefix:
                            out.setdefault(rel, [])
                        stack.append((entry.path, rel + "/"))
                    elif is_stream_name(rel):
                        out.setdefault(top(rel), []).append(rel)
                except FileNotFoundError:
                    continue
        return out

    def _stat(self, rel: str) -> Stat | None:
        try:
            st = os.stat(os.path.join(self.root, rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return Stat(rel, st.st_size, (st.st_size, st.st_mtime_ns), max(st.st_mtime_ns, st.st_ctime_ns) / 1e9,
                    f"{st.st_dev}:{st.st_ino}")

    def list(self, after: dict[str, str], tracked: set[str]) -> Listing:
        names = self._names()
        below, wanted = _split(names, after, tracked)
        stats = {rel: s for rel in wanted if (s := self._stat(rel)) is not None}
        return Listing(stats, below, set(names))

    def stat(self, rels: Iterable[str]) -> dict[str, Stat]:
        return {rel: s for rel in rels if (s := self._stat(rel)) is not None}

    def open(self, s: Stat) -> _Bounded:
        f = open(os.path.join(self.root, s.rel), "rb")  # noqa: SIM115 closed by _Bounded
        st = os.fstat(f.fileno())
        if f"{st.st_dev}:{st.st_ino}" != s.id:
            f.close()
            raise Changed(s.rel)
        return _Bounded(f, s.size)


class FsspecStore:
    id_is_content = False

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root
        self._infos: dict[str, dict] = {}

    def _rel(self, path: str) -> str:
        path, root = path.rstrip("/").lstrip("/"), self.root.lstrip("/")
        return path[len(root) + 1 :] if path.startswith(root + "/") else path

    def _stat(self, rel: str) -> Stat | None:
        info = self._infos.get(rel)
        if info is None:
            return None
        size = int(info.get("size") or 0)
        mtime = next((info[k] for k in ("mtime", "LastModified", "updated", "created") if info.get(k) is not None), None)
        etag = info.get("ETag") or info.get("etag")
        return Stat(rel, size, (size, str(mtime), etag), _seconds(mtime), etag)

    def list(self, after: dict[str, str], tracked: set[str]) -> Listing:
        self.fs.invalidate_cache(self.root)  # another writer's files must be seen: no cached listing
        cache = getattr(self.fs, "dircache", None)
        if cache:
            for key in [k for k in list(cache) if k.startswith(self.root.rstrip("/") + "/")]:
                cache.pop(key, None)
        try:
            found = self.fs.find(self.root, detail=True, withdirs=True)
        except FileNotFoundError:
            found = {}
        self._infos, names, dirs = {}, {}, set()
        for path, info in found.items():
            rel = self._rel(path)
            if not rel or rel == self.root.strip("/"):
                continue
            if info.get("type") == "directory":
                if "/" not in rel:
                    dirs.add(rel)
            elif is_stream_name(rel):
                self._infos[rel] = info
                names.setdefault(top(rel), []).append(rel)
        below, wanted = _split(names, after, tracked)
        return Listing({rel: s for rel in wanted if (s := self._stat(rel)) is not None}, below, dirs | set(names))

    def stat(self, rels: Iterable[str]) -> dict[str, Stat]:
        return {rel: s for rel in rels if (s := self._stat(rel)) is not None}

    def open(self, s: Stat) -> _Bounded:
        path = f"{self.root}/{s.rel}"
        try:
            f = self.fs.open(path, "rb", cache_type="none")
        except TypeError:
            f = self.fs.open(path, "rb")
        return _Bounded(f, s.size)


class S3Store:
    id_is_content = True

    def __init__(self, fs, root: str):
        self.fs = fs
        self.bucket, key, _ = fs.split_path(root)
        self.base = key.strip("/") + "/" if key.strip("/") else ""

    def _pages(self, **kw) -> Iterable[dict]:
        token = None
        while True:
            page = self.fs.call_s3("list_objects_v2", Bucket=self.bucket, **kw, **({"ContinuationToken": token} if token else {}))
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _from(self, rel: str, size: int, etag: str, modified: Any) -> Stat:
        etag = etag.strip('"')
        return Stat(rel, size, (size, str(modified), etag), _seconds(modified), etag)

    def list(self, after: dict[str, str], tracked: set[str]) -> Listing:
        stats, dirs = {}, set(after) - {""}
        start = {"StartAfter": self.base + after[""]} if after.get("") else {}
        try:
            pages = list(self._pages(Prefix=self.base, Delimiter="/", **start))
        except FileNotFoundError:  # no such bucket: an empty stream, like a missing directory
            return Listing({}, None, set())
        for page in pages:
            for p in page.get("CommonPrefixes", []):
                dirs.add(p["Prefix"][len(self.base) :].rstrip("/"))
            for o in page.get("Contents", []):
                rel = o["Key"][len(self.base) :]
                if is_stream_name(rel):
                    stats[rel] = self._from(rel, o["Size"], o.get("ETag", ""), o.get("LastModified"))
        for d in sorted(dirs):
            start = {"StartAfter": self.base + after[d]} if after.get(d) else {}
            for page in self._pages(Prefix=f"{self.base}{d}/", **start):
                for o in page.get("Contents", []):
                    rel = o["Key"][len(self.base) :]
                    if is_stream_name(rel):
                        stats[rel] = self._from(rel, o["Size"], o.get("ETag", ""), o.get("LastModified"))
        # files still open whose names the watermark has passed: one HEAD each (they are few: changed lately)
        stats.update(self.stat(rel for rel in tracked if rel not in stats and rel <= after.get(top(rel), "")))
        return Listing(stats, None, dirs)

    def stat(self, rels: Iterable[str]) -> dict[str, Stat]:
        out = {}
        for rel in rels:
            try:
                h = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.base + rel)
            except FileNotFoundError:
                continue
            out[rel] = self._from(rel, h["ContentLength"], h.get("ETag", ""), h.get("LastModified"))
        return out

    def open(self, s: Stat) -> "_S3Range":
        return _S3Range(self, s)


class _S3Range:
    """Ranged GETs of one object version: ``If-Match`` its ETag, so a replaced object is never mixed in."""

    def __init__(self, store: S3Store, s: Stat):
        self.store, self.s, self.pos = store, s, 0
        self.head = b""

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        end = min(self.pos + n, self.s.size)
        if end <= self.pos:
            return b""
        fs = self.store.fs
        cond = {"IfMatch": f'"{self.s.id}"'} if self.s.id else {}
        try:
            data = sync(fs.loop, _get_range, fs, self.store.bucket, self.store.base + self.s.rel, self.pos, end, cond)
        except FileNotFoundError as e:
            raise Changed(self.s.rel) from e
        except OSError as e:
            if _precondition_failed(e):
                raise Changed(self.s.rel) from e
            raise
        if self.pos == 0:
            self.head = data
        self.pos += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


async def _get_range(fs, bucket: str, key: str, start: int, end: int, cond: dict) -> bytes:
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **cond)
    try:
        return await resp["Body"].read()
    finally:
        resp["Body"].close()


def _precondition_failed(e: BaseException) -> bool:
    cause = e.__cause__
    response = getattr(cause, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412") or status == 412 or (e.errno == errno.EINVAL and "re-condition" in str(e))


def make_store(fs, root: str):
    if isinstance(fs, LocalFileSystem):
        return LocalStore(fs, root)
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if hasattr(fs, "call_s3") and {"s3", "s3a"} & set(protocols):
        return S3Store(fs, root)
    return FsspecStore(fs, root)
