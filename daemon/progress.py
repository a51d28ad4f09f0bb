"""Showing a run's progress: a live status line on a terminal, structured lines otherwise."""

import json
import sys
import threading
import time
from typing import Any, TextIO


def status_line(s: dict[str, Any]) -> str:
    gate = s.get("last_gate") or {}
    buf = s.get("buffer") or {}
    loss = f"{s['loss']:.3f}" if s.get("loss") is not None else "-"
    lr = f"{s['lr']:.2e}" if s.get("lr") is not None else "-"
    return " | ".join([
        f"step {s.get('step', 0):>6}",
        f"{s.get('tokens_per_s') or 0:>6.0f} tok/s",
        f"loss {loss:>6}",
        f"lr {lr:>8}",
        f"buffer {buf.get('size', 0)}/{buf.get('capacity', 0)}",
        f"serving v{'-' if s.get('served_version') is None else s['served_version']}",
        f"gate {gate.get('verdict', '-')}@{gate.get('step', '-')}",
        str(s.get("state", "")),
    ])


class Progress:
    """``update`` often; it redraws a terminal line at most every ``tty_interval_s`` and logs every ``interval_s``."""

    def __init__(self, out: TextIO | None = None, interval_s: float = 5.0, tty_interval_s: float = 0.25, clock=time.monotonic):
        self.out = out or sys.stdout
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.interval_s = interval_s if not self.tty else tty_interval_s
        self.clock = clock
        self._last = -float("inf")
        self._width = 0
        self._lock = threading.Lock()  # events come from the ingest thread and the lease renewer too

    def _write(self, text: str) -> None:
        """Write and flush; a closed output (a pipe whose reader quit) silences progress, never the run."""
        with self._lock:
            if self.out is None:
                return
            try:
                self.out.write(text)
                self.out.flush()
            except (BrokenPipeError, ValueError, OSError):
                self.out = None

    def update(self, status: dict[str, Any], force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        if self.tty:
            line = status_line(status)
            pad = max(0, self._width - len(line))
            self._write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self._write(json.dumps({"event": "progress", **_compact(status)}, default=str) + "\n")

    def event(self, name: str, **fields: Any) -> None:
        """A one-off event (promotion, rejection, checkpoint, resume): its own line."""
        if self.tty:
            msg = " ".join(f"{k}={v}" for k, v in fields.items())
            self._write("\r" + " " * self._width + "\r" + f"[{time.strftime('%H:%M:%S')}] {name}: {msg}\n")
            self._width = 0
        else:
            self._write(json.dumps({"event": name, "ts": time.time(), **fields}, default=str) + "\n")

    def close(self) -> None:
        if self.tty and self._width:
            self._write("\n")


def _compact(s: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.items()}
