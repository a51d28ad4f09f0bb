"""Dead-letter sink: every record that could not become a document, with why and from where.

One JSON object per line: reason, detail, provenance, sha256 and size of the
whole record, and its first ``keep_bytes`` (as text if UTF-8, else base64).
The full record stays addressable through its provenance.
"""

import base64
import hashlib
import json
import os
import time
from pathlib import Path

from everlearn.daemon.records import Rejection


def _safe_repr(value: object) -> str:
    """``repr(value)`` that cannot raise: a provenance value's own __repr__ may be broken, or recurse too deep."""
    try:
        return repr(value)
    except Exception as e:
        return f"<unprintable {type(value).__name__}: {type(e).__name__}>"


def _plain(value: object) -> object:
    """A scalar JSON writes as it is; anything else as its repr (the fallback when a row will not serialise)."""
    return value if value is None or isinstance(value, str | int | float | bool) else _safe_repr(value)


def _json_line(row: dict) -> str:
    """The row as one JSON line, whatever the provenance holds, so that writing a dead letter never stops the stream.

    Values JSON has no type for (bytes, sets, objects) are written as their repr. When the
    provenance cannot be written even so (keys that are not strings or do not sort, a cycle,
    nesting too deep), every value that is not a scalar is written as its repr.
    """
    try:
        return json.dumps(row, sort_keys=True, default=_safe_repr)
    except (TypeError, ValueError, RecursionError):
        return json.dumps({key: _plain(value) for key, value in row.items()}, sort_keys=True)


class DeadLetterSink:
    def __init__(self, path: str | Path, keep_bytes: int = 65536, clock=time.time):
        self.path = Path(path)
        self.keep_bytes = keep_bytes
        self.clock = clock
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _raw(self, data: bytes) -> tuple[str, str]:
        """The record's first ``keep_bytes`` and their encoding: as text when UTF-8 (or cut inside a character), else base64."""
        head = data[: self.keep_bytes]
        try:
            return head.decode("utf-8"), "utf-8"
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data" and len(data) > self.keep_bytes:
                return head[: e.start].decode("utf-8", "replace"), "utf-8"  # cut inside a character
            return base64.b64encode(head).decode("ascii"), "base64"

    def _line(self, r: Rejection) -> str:
        """One rejection as its JSON line."""
        data = r.record.data
        raw, encoding = self._raw(data)
        return _json_line({
            "ts": self.clock(),
            "reason": r.reason,
            "detail": r.detail,
            "provenance": r.record.provenance,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "raw": raw,
            "raw_encoding": encoding,
            "raw_truncated": len(data) > self.keep_bytes,
        })

    def write(self, rejections: list[Rejection]) -> None:
        """Append one JSON line per rejection and fsync, so a dead letter survives a crash right after it."""
        if not rejections:
            return
        lines = [self._line(r) for r in rejections]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.count += len(rejections)
