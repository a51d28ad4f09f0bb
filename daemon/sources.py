"""Document sources: ``poll`` raw records, report a JSON position, ``seek`` back to one.

``DirectorySource`` watches a directory on any fsspec URL (``file://`` by
default; ``memory://`` and ``s3://`` too: daemon/stores.py picks how each is listed and read)
for ``*.jsonl`` (one JSON object per line) and ``*.txt`` (one document per file).
Files are read in name order; a ``.jsonl`` may grow (appended lines are picked
up). A final line without a newline, and a ``.txt``, are taken once the file's
size and modification time have not changed for ``settle_s``. A ``.txt`` is read
up to ``max_line_bytes + 1`` bytes, never more.

``*.jsonl.gz``, ``*.jsonl.zst``, ``*.txt.gz`` and ``*.txt.zst`` are decompressed while
read (gzip, zstd), in chunks of ``read_chunk_bytes``, never whole, into the same records
(``provenance`` offsets count decompressed bytes, as does the position's ``offset``). A
compressed file is read once it has settled (a stream still being written cannot be
decoded to its end), then to its end, and finished like a read file: it is not read
for growth, and other content under it later is ``file_replaced``. A damaged one
(bad header, corrupt data, cut short) delivers the records decoded before the damage;
the rest is skipped (``file_corrupt``) and it is not read again.

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
- ``file_corrupt``: a compressed file that cannot be decoded past ``offset`` (``error``); the
  rest is skipped; ``bytes``: the compressed bytes after the damage was found (0: cut short).

For a compressed file ``offset`` counts decompressed bytes and ``size``/``bytes`` compressed
ones (unread ``bytes`` are its size until it was read to its end, then 0).

Transient storage errors raise ``SourceUnavailable`` with the position at what was
delivered; the caller retries. The position is
``{"format": 2, "dirs": {dir: {"after", "digest", "changed"}}, "files": {rel: {"offset", "id", "fp", "fpn"}}}``
with an entry only for open files (a compressed one's also ``size`` and ``end``: see
daemon/source_position.py); ``seek`` also takes the old ``{"offsets": {rel: n}}``.

This module holds the ``Source`` Protocol and ``DirectorySource``'s poll loop; the
parts live beside it: daemon/source_position.py (the state and its JSON form),
source_identity.py (renames, truncation, replacement), source_watermarks.py (closing
and late files), source_reading.py (lines and documents), source_compression.py
(compressed files), source_events.py (reports).
"""

import logging
import time
from typing import Any, Protocol

import fsspec

from everlearn.daemon import source_position
from everlearn.daemon.listing import Changed, is_compressed, is_txt
from everlearn.daemon.records import RawRecord
from everlearn.daemon.source_compression import Corrupt, Unpacker
from everlearn.daemon.source_events import Events, emit, event_fields
from everlearn.daemon.source_identity import Retry, reconcile, refresh_fp
from everlearn.daemon.source_position import OpenFile, Watermark
from everlearn.daemon.source_reading import read_lines, read_txt
from everlearn.daemon.source_watermarks import advance
from everlearn.daemon.stores import make_store
from everlearn.errors import SourceError, SourceUnavailable
from everlearn.retry import is_transient

log = logging.getLogger(__name__)


class Source(Protocol):
    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[RawRecord]: ...

    def position(self) -> dict[str, Any]: ...

    def seek(self, position: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


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
        self._files: dict[str, OpenFile] = {}
        self._dirs: dict[str, Watermark] = {}
        self._unpacker = Unpacker(read_chunk_bytes, max_line_bytes)  # decodes compressed files, one kept from poll to poll

    # -- position ----------------------------------------------------------
    def position(self) -> dict[str, Any]:
        return source_position.encode(self._files, self._dirs)

    def seek(self, position: dict[str, Any]) -> None:
        self._files, self._dirs = source_position.decode(position, self.clock())
        self._unpacker.drop()

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
            files, events = reconcile(self.store, self._files, self._dirs, listing, now)
        except Retry:
            return []
        except Exception as e:
            err = self._fail(e, "listing")
            if err is e:
                raise
            raise err from e
        self._files = files  # identities settled: commit before reading, then report
        for d in listing.dirs:
            self._dirs.setdefault(d, Watermark())
        for name, fields in events:
            self._emit(name, fields)
        out: list[RawRecord] = []
        for rel, f in sorted(files.items()):
            if len(out) >= max_records:
                break
            s, txt, packed = f.stat, is_txt(rel), is_compressed(rel)
            settled = now - f.changed_at >= self.settle_s
            if s is None:
                continue
            if packed:
                due = settled and not f.end and s.size > 0  # read once settled, then on to its end
            else:  # a .txt is taken once, settled; a .jsonl has bytes beyond its offset
                due = settled and f.offset == 0 and s.size > 0 if txt else s.size > f.offset
            if not due:
                continue
            try:
                with self.store.open(s) as r:
                    if packed:
                        for rec in self._unpacker.records(r, rel, f, s, max_records - len(out), self._domain(rel)):
                            out.append(rec)
                    elif txt:
                        data = read_txt(r, f, s, self.max_line_bytes)
                        out.append(RawRecord(data, "txt", {"file": rel, "offset": 0}, rel, self._domain(rel)))
                    else:
                        for rec in read_lines(r, rel, f, s.size, settled, max_records - len(out), domain=self._domain(rel),
                                              max_line_bytes=self.max_line_bytes, read_chunk_bytes=self.read_chunk_bytes):
                            out.append(rec)  # one by one: a failure later keeps what was read (its offset is set)
                        refresh_fp(r, f)
            except (Changed, FileNotFoundError):
                continue  # moved meanwhile: the next listing tells what happened
            except Corrupt as e:  # the records before the damage are out; the rest is skipped, never read again
                f.end = True
                self._emit("file_corrupt", {**event_fields(rel, s.id, f.offset, s.size, e.unread), "error": str(e)})
            except Exception as e:
                if out and is_transient(e):
                    log.warning("source %s: reading %s failed (%s); returning the %d records read", self.url, rel, e, len(out))
                    break  # the position is at the last record delivered; the next poll retries
                err = self._fail(e, f"reading {rel}")
                if err is e:
                    raise
                raise err from e
        advance(self.store, self._files, self._dirs, listing, now, self.close_after_s, self._emit, self.url)
        return out

    def _domain(self, rel: str) -> str:
        return rel.split("/", 1)[0] if "/" in rel else self.default_domain

    def _emit(self, name: str, fields: dict[str, Any]) -> None:
        emit(self.events, self.url, name, fields)
