"""Document sources: ``poll`` raw records, report a JSON position, ``seek`` back to one.

``DirectorySource`` watches a directory on any fsspec URL (``file://`` by
default; ``memory://`` and ``s3://`` too: daemon/listing.py lists and reads each)
for ``*.jsonl`` (one JSON object per line) and ``*.txt`` (one document per file).
Files are read in name order; a ``.jsonl`` may grow (appended lines are picked
up). A final line without a newline, and a ``.txt``, are taken once the file's
size and modification time have not changed for ``settle_s``. A ``.txt`` is read
up to ``max_line_bytes + 1`` bytes, never more.

Files are known by identity, not by name: ``dev:ino`` locally, the ETag on s3, and
everywhere a hash of the file's first bytes. A renamed file keeps its offset;
a deleted file, one truncated below its offset, and one whose content was replaced
are reported (``events``) and never read again from the start: nothing is trained
twice. None of them stops the stream.

Each top-level directory (a domain, ``""`` for the root) has a watermark: the
files up to it are finished and no longer looked at (on s3 not even listed), so a
poll costs what is new or still changing, not what was read months ago. The
watermark passes a file once it was read to its end and first seen
``close_after_s`` ago (a file still growing then stays open below it); a file read
to its end and unchanged for ``close_after_s`` is closed: later appends are not
read. **Name new files so they sort after the ones before** (timestamps,
counters): a new file whose name sorts at or below its directory's watermark is
reported ``file_late`` once and not read. Locally and on memory:// that is noticed
when the set of names up to the watermark changes (a finished file rewritten in
place goes unnoticed); on s3 such a file is not seen at all, nor is a new
top-level directory that sorts below the last root-level file passed.

Events (``events(name, fields)``; logged when ``events`` is None), all with
``file``, ``identity``, ``offset``, ``size`` and ``bytes``:

- ``file_renamed``: ``from``/``to``; the offset is kept; ``bytes`` still unread.
- ``file_deleted``: gone before it was closed; ``bytes`` never read (size - offset).
- ``file_truncated``: its size fell below the offset; reading goes on from the new end; ``bytes`` lost.
- ``file_replaced``: other content under the name (``old_identity``); not read again; ``bytes`` skipped.
- ``file_late``: a new name at or below the watermark (``watermark``); not read; ``bytes`` = size.

Transient storage errors raise ``SourceUnavailable`` with the position at what was
delivered; the caller retries. The position is
``{"format": 2, "dirs": {dir: {"after", "digest", "changed"}}, "files": {rel: {"offset", "id", "fp", "fpn"}}}``
with an entry only for open files; ``seek`` also takes the old ``{"offsets": {rel: n}}``.
"""

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import fsspec

from everlearn.daemon.listing import (
    FP_MAX,
    Changed,
    Listing,
    Stat,
    digest,
    fingerprint,
    make_store,
    top,
)
from everlearn.daemon.records import RawRecord
from everlearn.errors import SourceError, SourceUnavailable
from everlearn.retry import is_transient

log = logging.getLogger(__name__)
RENAME_CANDIDATES = 8  # new files, closest in size, whose first bytes are compared with a vanished file's
Events = Callable[[str, dict[str, Any]], None]


class Source(Protocol):
    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[RawRecord]: ...

    def position(self) -> dict[str, Any]: ...

    def seek(self, position: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class _File:
    """An open file: read up to ``offset``; identity ``id`` and ``fp`` (hash of its first ``fpn`` bytes)."""

    offset: int = 0
    id: str | None = None
    fp: str = ""
    fpn: int = 0
    first_seen: float = 0.0
    changed_at: float = 0.0  # clock time its size/mtime last changed
    sig: tuple | None = None
    stat: Stat | None = None  # this poll's


@dataclasses.dataclass
class _Dir:
    after: str = ""  # the watermark: every name up to it is finished or held in files
    digest: str = ""  # of the names up to the watermark, to notice one added (late)
    changed: float = 0.0  # newest change time of the files closed (or reported late) here: a name below with a newer one is late


class _Retry(Exception):
    """A file moved while it was being identified: the poll returns nothing, the next one looks again."""


class DirectorySource:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, default_domain: str = "default",
                 read_chunk_bytes: int = 1 << 20, max_line_bytes: int = 1 << 20, clock=time.monotonic,
                 settle_s: float = 2.0, close_after_s: float = 300.0, events: Events | None = None):
        self.url = url.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ValueError, ImportError) as e:
            raise SourceError(f"cannot open source.url={url!r}: {e}") from e
        if settle_s < 0 or close_after_s < 0:
            raise SourceError(f"source.settle_s ({settle_s}) and source.close_after_s ({close_after_s}) must be >= 0")
        self.root = root.rstrip("/")
        self.store = make_store(self.fs, self.root)
        self.default_domain = default_domain
        self.read_chunk_bytes = read_chunk_bytes
        self.max_line_bytes = max_line_bytes  # a longer line (or .txt) is cut off and delivered as too large
        self.clock = clock
        self.settle_s, self.close_after_s = settle_s, close_after_s
        self.events = events
        self._files: dict[str, _File] = {}
        self._dirs: dict[str, _Dir] = {}

    # -- position ----------------------------------------------------------
    def position(self) -> dict[str, Any]:
        files = {}
        for rel, f in sorted(self._files.items()):
            entry: dict[str, Any] = {"offset": f.offset}
            if f.id is not None:
                entry["id"] = f.id
            if f.fpn:
                entry.update(fp=f.fp, fpn=f.fpn)
            files[rel] = entry
        dirs = {d: dataclasses.asdict(s) for d, s in sorted(self._dirs.items())}
        return {"format": 2, "dirs": dirs, "files": files}

    def seek(self, position: dict[str, Any]) -> None:
        now = self.clock()
        try:
            if "format" not in position and "offsets" in position:  # before format 2: identity learned at first sight
                files = {str(k): {"offset": int(v)} for k, v in position["offsets"].items()}
                dirs: dict[str, Any] = {}
            else:
                files, dirs = position.get("files", {}), position.get("dirs", {})
            self._files = {str(rel): _File(int(e["offset"]), e.get("id"), str(e.get("fp", "")), int(e.get("fpn", 0)), now, now)
                           for rel, e in files.items()}
            self._dirs = {str(d): _Dir(str(s.get("after", "")), str(s.get("digest", "")), float(s.get("changed", 0.0)))
                          for d, s in dirs.items()}
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise SourceError(f"source position is not one this source wrote ({type(e).__name__}: {e})") from e

    def close(self) -> None:
        pass

    # -- polling -----------------------------------------------------------
    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[RawRecord]:
        """Up to ``max_records`` new records; waits up to ``timeout_s`` for the first."""
        deadline = self.clock() + timeout_s
        while True:
            out = self._take(max_records)
            if out or self.clock() >= deadline:
                return out
            time.sleep(min(0.2, max(0.0, deadline - self.clock())))

    def _fail(self, e: Exception, what: str) -> Exception:
        """A storage failure as SourceUnavailable (transient) or SourceError (e.g. permission denied); anything else as it is."""
        if is_transient(e):
            return SourceUnavailable(f"source.url={self.url!r}: {what} failed, retry later ({type(e).__name__}: {e})")
        if isinstance(e, OSError):
            return SourceError(f"source.url={self.url!r}: {what} failed ({type(e).__name__}: {e})")
        return e

    def _take(self, max_records: int) -> list[RawRecord]:
        now = self.clock()
        try:
            listing = self.store.list({d: s.after for d, s in self._dirs.items()}, set(self._files))
            files, events = self._reconcile(listing, now)
        except _Retry:
            return []
        except Exception as e:
            err = self._fail(e, "listing")
            if err is e:
                raise
            raise err from e
        self._files = files  # identities settled: commit before reading, then report
        for d in listing.dirs:
            self._dirs.setdefault(d, _Dir())
        for name, fields in events:
            self._emit(name, fields)
        out: list[RawRecord] = []
        for rel, f in sorted(files.items()):
            if len(out) >= max_records:
                break
            s, txt = f.stat, rel.endswith(".txt")
            settled = now - f.changed_at >= self.settle_s
            if s is None or (not settled or f.offset > 0 or s.size == 0 if txt else s.size <= f.offset):
                continue  # a .txt is taken once, settled; a .jsonl has bytes beyond its offset
            try:
                with self.store.open(s) as r:
                    if txt:
                        data = self._read_txt(r, rel, f, s)
                        out.append(RawRecord(data, "txt", {"file": rel, "offset": 0}, rel, self._domain(rel)))
                    else:
                        for rec in self._lines(r, rel, f, s.size, settled, max_records - len(out)):
                            out.append(rec)  # one by one: a failure later keeps what was read (its offset is set)
                        self._refresh_fp(r, f)
            except (Changed, FileNotFoundError):
                continue  # moved meanwhile: the next listing tells what happened
            except Exception as e:
                if out and is_transient(e):
                    log.warning("source %s: reading %s failed (%s); returning the %d records read", self.url, rel, e, len(out))
                    break  # the position is at the last record delivered; the next poll retries
                err = self._fail(e, f"reading {rel}")
                if err is e:
                    raise
                raise err from e
        self._advance(listing, now)
        return out

    # -- identity ----------------------------------------------------------
    def _content_ok(self, f: _File, s: Stat) -> bool:
        """Whether ``s`` starts with the bytes ``f`` was fingerprinted on (always, when nothing was)."""
        if f.fpn == 0:
            return True
        if s.size < f.fpn:
            return False
        try:
            with self.store.open(s) as r:
                r.seek(0)
                return fingerprint(r.read(f.fpn)) == f.fp
        except (Changed, FileNotFoundError) as e:
            raise _Retry from e

    def _reconcile(self, listing: Listing, now: float) -> tuple[dict[str, _File], list]:
        """Match the open files to what the listing shows: same name, renamed, truncated, replaced, deleted; add new ones."""
        old = {rel: dataclasses.replace(f, stat=None) for rel, f in self._files.items()}
        unclaimed, files, events, lost, freed = dict(listing.stats), {}, [], [], set()
        checked: dict[tuple[str, str], bool] = {}

        def same(rel: str, s: Stat) -> bool:  # one read at most per (open file, candidate) and poll
            if (rel, s.rel) not in checked:
                checked[rel, s.rel] = self._content_ok(old[rel], s)
            return checked[rel, s.rel]

        def claim(rel: str, f: _File, s: Stat) -> None:
            if s.sig != f.sig:
                f.changed_at = now
            if s.size < f.offset:
                events.append(("file_truncated", self._fields(rel, s.id, f.offset, s.size, f.offset - s.size)))
                f.offset = s.size
                if f.fpn > s.size:
                    f.fp, f.fpn = "", 0
            f.sig, f.id, f.stat = s.sig, s.id, s
            files[rel] = f
            del unclaimed[rel]

        def renamed(rel: str, f: _File, s: Stat) -> None:
            events.append(("file_renamed", {**self._fields(s.rel, s.id, f.offset, s.size, max(0, s.size - f.offset)),
                                            "from": rel, "to": s.rel}))
            freed.add(rel)
            claim(s.rel, f, s)

        for rel, f in sorted(old.items()):
            s = unclaimed.get(rel)
            if s is not None and (s.sig == f.sig and s.id == f.id or f.id is not None and s.id == f.id and (
                    self.store.id_is_content or s.size < f.offset or same(rel, s))):
                claim(rel, f, s)  # unchanged, or the same file (inode / ETag) changed: grown or truncated
            else:
                lost.append(rel)
        by_id: dict[str, list[Stat]] = {}
        for s in unclaimed.values():
            if s.id is not None:
                by_id.setdefault(s.id, []).append(s)
        still = []
        for rel in lost:  # moved: the same inode or ETag under another name
            f = old[rel]
            match = next((s for s in by_id.get(f.id or "", []) if s.rel in unclaimed and s.rel != rel and (
                self.store.id_is_content or same(rel, s))), None)
            if match is not None:
                renamed(rel, f, match)
            else:
                still.append(rel)
        lost, still = still, []
        for rel in lost:  # the same content under the same name (rewritten longer: s3 "appends", atomic replace)
            f, s = old[rel], unclaimed.get(rel)
            if s is not None and s.size >= f.offset and same(rel, s):
                claim(rel, f, s)
            else:
                still.append(rel)
        for rel in still:
            f, s = old[rel], unclaimed.get(rel)
            if f.fpn:  # moved where only the content tells (memory://, a copy between devices, rotation)
                prev = self._files[rel].stat
                was = prev.size if prev is not None else f.offset
                near = sorted((t for t in unclaimed.values() if t.rel != rel and t.size >= max(f.offset, f.fpn)
                               and t.rel.endswith(rel[rel.rfind(".") :])), key=lambda t: abs(t.size - was))
                match = next((t for t in near[:RENAME_CANDIDATES] if same(rel, t)), None)  # bounded reads
                if match is not None:
                    renamed(rel, f, match)
                    continue
            if s is None:
                prev = self._files[rel].stat
                size = prev.size if prev is not None else f.offset
                events.append(("file_deleted", self._fields(rel, f.id, f.offset, size, max(0, size - f.offset))))
            elif s.size < f.offset:
                claim(rel, f, s)
            else:  # other content under this name: not read again from the start (nothing is trained twice)
                events.append(("file_replaced", {**self._fields(rel, s.id, f.offset, s.size, s.size), "old_identity": f.id}))
                f.offset, f.fp, f.fpn = s.size, "", 0
                claim(rel, f, s)
        for rel, s in sorted(unclaimed.items()):
            d = self._dirs.get(top(rel))
            if d is None or rel > d.after or rel in freed:
                files[rel] = _File(0, s.id, "", 0, now, now, s.sig, s)
        return files, events

    def _refresh_fp(self, r, f: _File) -> None:
        """Fingerprint the file's first bytes read so far (up to FP_MAX), doubling its length as the file grows."""
        want = min(FP_MAX, f.offset)
        if want > f.fpn and (f.fpn == 0 or want >= 2 * f.fpn or want == FP_MAX):
            head = r.head[:want] if len(r.head) >= want else b""
            if not head:
                r.seek(0)
                head = r.read(want)
            f.fp, f.fpn = fingerprint(head), len(head)

    # -- watermarks and closing --------------------------------------------
    def _advance(self, listing: Listing, now: float) -> None:
        """Move each directory's watermark past files first seen close_after_s ago; close finished files below it; report late ones."""
        unsure = set()  # directories whose late check failed: their digest stays, the check runs again
        if listing.below is not None:
            for d, names in listing.below.items():
                state = self._dirs.get(d)
                if state is None or not state.digest or digest(names) == state.digest:
                    continue
                untracked = [n for n in names if n not in self._files]
                try:
                    stats = self.store.stat(untracked)
                except Exception as e:  # noqa: BLE001 a report only: try again next poll
                    log.warning("source %s: checking for late files failed: %s", self.url, e)
                    unsure.add(d)
                    continue
                late = [s for _, s in sorted(stats.items()) if s.ts is not None and s.ts > state.changed]
                for s in late:
                    self._emit("file_late", {**self._fields(s.rel, s.id, 0, s.size, s.size), "watermark": state.after})
                state.changed = max([state.changed] + [s.ts for s in late])  # reported once
        by_dir: dict[str, list[str]] = {}
        for rel in sorted(self._files):
            by_dir.setdefault(top(rel), []).append(rel)
        for d, rels in by_dir.items():
            state = self._dirs.setdefault(d, _Dir())
            for rel in rels:  # past files read to their end (a backlog stays listed) and seen long enough
                if rel > state.after:
                    if now - self._files[rel].first_seen < self.close_after_s or not self._done(rel, self._files[rel]):
                        break
                    state.after = rel
            for rel in rels:
                f = self._files[rel]
                if rel <= state.after and now - f.changed_at >= self.close_after_s and self._done(rel, f):
                    del self._files[rel]
                    state.changed = max(state.changed, f.stat.ts or 0.0)
        if listing.below is not None:
            for d, state in self._dirs.items():
                if d in unsure:
                    continue
                names = set(listing.below.get(d, [])) | {r for r in listing.stats if top(r) == d}
                state.digest = digest(sorted(n for n in names if n <= state.after)) if state.after else ""

    @staticmethod
    def _done(rel: str, f: _File) -> bool:
        """Read to its end as of this poll (a .txt: taken)."""
        if f.stat is None:
            return False
        return (f.offset > 0 or f.stat.size == 0) if rel.endswith(".txt") else f.offset >= f.stat.size

    # -- reading -----------------------------------------------------------
    def _domain(self, rel: str) -> str:
        return rel.split("/", 1)[0] if "/" in rel else self.default_domain

    def _fields(self, rel: str, identity: str | None, offset: int, size: int, nbytes: int) -> dict[str, Any]:
        return {"file": rel, "identity": identity, "offset": offset, "size": size, "bytes": nbytes}

    def _emit(self, name: str, fields: dict[str, Any]) -> None:
        if self.events is None:
            log.warning("source %s: %s %s", self.url, name, fields)
            return
        try:
            self.events(name, fields)
        except Exception:  # noqa: BLE001 a report must not stop the stream
            log.exception("source %s: the events callback failed on %s", self.url, name)

    def _read_txt(self, r, rel: str, f: _File, s: Stat) -> bytes:
        """At most max_line_bytes + 1 bytes: a longer document is rejected as too large without reading the rest."""
        r.seek(0)
        data = r.read(self.max_line_bytes + 1)
        n = min(FP_MAX, len(data))
        f.offset, f.fp, f.fpn = s.size, fingerprint(data[:n]), n
        return data

    def _lines(self, f, rel: str, state: _File, size: int, settled: bool, limit: int) -> Iterator[RawRecord]:
        """Complete lines from the offset; a line longer than ``max_line_bytes`` is cut (and later rejected as too large)."""
        domain = self._domain(rel)
        cap = self.max_line_bytes
        offset = state.offset
        f.seek(offset)
        pos, n, eof = offset, 0, False
        head, skipped = b"", 0  # the current line's first cap+1 bytes; bytes of it dropped beyond them
        while n < limit:
            nl = head.find(b"\n")
            if nl >= 0:
                line, advance, rest = head[:nl], nl + 1, head[nl + 1 :]
            elif eof:
                if not head or not settled or pos + len(head) + skipped < size:
                    break  # a final line still being written: wait for its newline or for the file to settle
                line, advance, rest = head, len(head), b""
            else:
                chunk = f.read(self.read_chunk_bytes)
                if not chunk:
                    eof = True
                    continue
                if len(head) > cap and b"\n" not in chunk:
                    skipped += len(chunk)
                    continue
                head += chunk
                if len(head) > cap and b"\n" not in head[: cap + 1]:
                    cut = head.find(b"\n", cap + 1)
                    if cut < 0:
                        skipped += len(head) - (cap + 1)
                        head = head[: cap + 1]
                    else:
                        skipped += cut - (cap + 1)
                        head = head[: cap + 1] + head[cut:]
                continue
            start = pos
            pos += advance + skipped
            head, skipped = rest, 0
            state.offset = pos
            if line.strip():
                n += 1
                yield RawRecord(line, "jsonl", {"file": rel, "offset": start}, f"{rel}@{start}", domain)
