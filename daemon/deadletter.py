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


class DeadLetterSink:
    def __init__(self, path: str | Path, keep_bytes: int = 65536, clock=time.time):
        self.path = Path(path)
        self.keep_bytes = keep_bytes
        self.clock = clock
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rejections: list[Rejection]) -> None:
        if not rejections:
            return
        lines = []
        for r in rejections:
            data = r.record.data
            head = data[: self.keep_bytes]
            try:
                raw, encoding = head.decode("utf-8"), "utf-8"
            except UnicodeDecodeError as e:
                if e.reason == "unexpected end of data" and len(data) > self.keep_bytes:
                    raw, encoding = head[: e.start].decode("utf-8", "replace"), "utf-8"  # cut inside a character
                else:
                    raw, encoding = base64.b64encode(head).decode("ascii"), "base64"
            lines.append(json.dumps({
                "ts": self.clock(),
                "reason": r.reason,
                "detail": r.detail,
                "provenance": r.record.provenance,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "raw": raw,
                "raw_encoding": encoding,
                "raw_truncated": len(data) > self.keep_bytes,
            }, sort_keys=True))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.count += len(rejections)
