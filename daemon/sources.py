"""Document sources: ``poll`` raw records, report a JSON position, ``seek`` back to one.

``DirectorySource`` watches a directory on any fsspec URL (``file://`` by
default; ``memory://`` and ``s3://`` through the same code) for ``*.jsonl``
(one JSON object per line) and ``*.txt`` (one document per file). Files are
read in name order; a file may grow (appended lines are picked up). A final
line without a newline, and a ``.txt`` file, are read once their size has not
changed between two polls, so half-written files are not taken.
Write files atomically (write elsewhere, then rename into place) when you can.

The position is ``{"offsets": {relative path: next unread byte}}``.
"""

import time
from collections.abc import Iterator
from typing import Any, Protocol

import fsspec

from everlearn.daemon.records import RawRecord
from everlearn.errors import SourceError

SUFFIXES = (".jsonl", ".txt")


class Source(Protocol):
    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[RawRecord]: ...

    def position(self) -> dict[str, Any]: ...

    def seek(self, position: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class DirectorySource:
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, default_domain: str = "default",
                 read_chunk_bytes: int = 1 << 20, max_line_bytes: int = 1 << 20, clock=time.monotonic):
        self.url = url.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ValueError, ImportError) as e:
            raise SourceError(f"cannot open source.url={url!r}: {e}") from e
        self.root = root.rstrip("/")
        self.default_domain = default_domain
        self.read_chunk_bytes = read_chunk_bytes
        self.max_line_bytes = max_line_bytes  # a longer line is cut off and delivered as too large
        self.clock = clock
        self._offsets: dict[str, int] = {}
        self._last_size: dict[str, int] = {}  # size seen at the previous poll: unchanged = settled

    # -- position ----------------------------------------------------------
    def position(self) -> dict[str, Any]:
        return {"offsets": dict(sorted(self._offsets.items()))}

    def seek(self, position: dict[str, Any]) -> None:
        self._offsets = {str(k): int(v) for k, v in position.get("offsets", {}).items()}

    def close(self) -> None:
        pass

    # -- listing -----------------------------------------------------------
    def _rel(self, path: str) -> str:
        path = path.rstrip("/")
        root = self.root
        if path.startswith(root + "/"):
            return path[len(root) + 1 :]
        # fsspec may return paths without a leading slash (memory://) or with one
        stripped_root = root.lstrip("/")
        p = path.lstrip("/")
        return p[len(stripped_root) + 1 :] if p.startswith(stripped_root + "/") else p

    def _files(self) -> list[tuple[str, int]]:
        try:
            if not self.fs.exists(self.root):
                return []
            found = self.fs.find(self.root, detail=True)
        except OSError as e:
            raise SourceError(f"cannot list source.url={self.url!r}: {e}") from e
        files = []
        for path, info in found.items():
            rel = self._rel(path)
            name = rel.rsplit("/", 1)[-1]
            if info.get("type") == "file" and name.endswith(SUFFIXES) and not name.startswith("."):
                files.append((rel, int(info.get("size") or 0)))
        return sorted(files)

    def _domain(self, rel: str) -> str:
        return rel.split("/", 1)[0] if "/" in rel else self.default_domain

    # -- polling -----------------------------------------------------------
    def poll(self, max_records: int, timeout_s: float = 0.0) -> list[RawRecord]:
        """Up to ``max_records`` new records; waits up to ``timeout_s`` for the first."""
        deadline = self.clock() + timeout_s
        while True:
            out = list(self._take(max_records))
            if out or self.clock() >= deadline:
                return out
            time.sleep(min(0.2, max(0.0, deadline - self.clock())))

    def _take(self, max_records: int) -> Iterator[RawRecord]:
        taken = 0
        sizes = self._files()
        for rel, size in sizes:
            if taken >= max_records:
                break
            offset = self._offsets.get(rel, 0)
            settled = self._last_size.get(rel) == size
            self._last_size[rel] = size
            if size <= offset:
                continue
            if rel.endswith(".txt"):
                if settled:
                    data = self.fs.cat_file(self._path(rel))
                    self._offsets[rel] = len(data)
                    taken += 1
                    yield RawRecord(data, "txt", {"file": rel, "offset": 0}, rel, self._domain(rel))
                continue
            for rec in self._lines(rel, offset, size, settled, max_records - taken):
                taken += 1
                yield rec
        self._last_size = {rel: s for rel, s in sizes}

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _lines(self, rel: str, offset: int, size: int, settled: bool, limit: int) -> Iterator[RawRecord]:
        """Complete lines from ``offset``; a line longer than ``max_line_bytes`` is cut (and later rejected as too large)."""
        domain = self._domain(rel)
        cap = self.max_line_bytes
        with self.fs.open(self._path(rel), "rb") as f:
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
                self._offsets[rel] = pos
                if line.strip():
                    n += 1
                    yield RawRecord(line, "jsonl", {"file": rel, "offset": start}, f"{rel}@{start}", domain)
