"""Turning a DirectorySource file's bytes into raw records: lines of a ``.jsonl``, the whole of a ``.txt``.

Both read through a store's reader (never past the size the listing saw) and move the
open file's offset as they go, so what was delivered is what the position says. A line
or document longer than ``max_line_bytes`` is cut to ``max_line_bytes + 1`` bytes (the
rest skipped, never held) and later rejected as too large.
"""

from collections.abc import Iterator

from everlearn.daemon.listing import FP_MAX, Stat, fingerprint
from everlearn.daemon.records import RawRecord
from everlearn.daemon.source_position import OpenFile
from everlearn.daemon.stores import Reader


def read_txt(r: Reader, f: OpenFile, s: Stat, max_line_bytes: int) -> bytes:
    """At most max_line_bytes + 1 bytes: a longer document is rejected as too large without reading the rest."""
    r.seek(0)
    data = r.read(max_line_bytes + 1)
    n = min(FP_MAX, len(data))
    f.offset, f.fp, f.fpn = s.size, fingerprint(data[:n]), n
    return data


def read_lines(r: Reader, rel: str, state: OpenFile, size: int, settled: bool, limit: int, *, domain: str,
               max_line_bytes: int, read_chunk_bytes: int) -> Iterator[RawRecord]:
    """Complete lines from the offset; a line longer than ``max_line_bytes`` is cut (and later rejected as too large).

    A final line without a newline is taken only once the file has ``settled`` and the
    whole ``size`` was read. Each record's offset is set before it is yielded.
    """
    cap = max_line_bytes
    offset = state.offset
    r.seek(offset)
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
            chunk = r.read(read_chunk_bytes)
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
