"""Append-only audit log of gate decisions and promotions (JSONL, one record per line, fsynced).

A crash in the middle of an append leaves a partial last line: readers skip
it, and the next append starts on a fresh line, so one torn write never hides
the records after it.
"""

import json
import os
import time
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: str | Path, clock=time.time):
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {"ts": self.clock(), **record}
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with open(self.path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn previous append
                    line = "\n" + line
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        return record

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            return _parse(f.read())

    def tail(self, max_bytes: int = 1 << 20) -> list[dict[str, Any]]:
        """The records in the last ``max_bytes`` of the log (what a restart needs, whatever the log's size)."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(max(0, start - 1))  # and the byte before: a newline there means the first line is whole
            data = f.read()
        if start > 0:
            data = data[data.find(b"\n") + 1 :]  # the first line is cut (or is that byte before a whole one)
        return _parse(data)


def _parse(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn line from a crash mid-append
        if isinstance(rec, dict):
            out.append(rec)
    return out
