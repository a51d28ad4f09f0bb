"""Retention of a checkpoint store: old checkpoints deleted, unfinished or damaged ones moved aside.

Mixed into ``CheckpointStore`` (checkpoints.py), whose bounded storage calls
(``io``), paths and listings it uses. Nothing damaged is ever deleted on sight:
it is moved to ``set-aside/step-N.<ms>/`` with a ``SET_ASIDE.json`` saying why,
and only set-aside entries beyond the newest ``keep_set_aside`` are deleted.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

from everlearn.errors import StorageUnavailable

SET_ASIDE = "set-aside"


@dataclass
class SetAside:
    """What a recovery or a sweep moved out of the way (``name``, where to, why) and deleted."""

    moved: list[tuple[str, str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class Retention:
    def set_aside(self, name: str, reason: str) -> tuple[str, str, str]:
        """Move checkpoint directory ``name`` under set-aside/ with a note of why; returns (name, new uri, reason)."""
        dest = f"{SET_ASIDE}/{name}.{int(time.time() * 1000)}"
        self.io.call("mkdir", "makedirs", self._path(SET_ASIDE), exist_ok=True)
        self.io.move(self._path(name), self._path(dest))
        note = json.dumps({"name": name, "reason": reason, "unix": time.time()}).encode()
        with contextlib.suppress(OSError, StorageUnavailable):
            self.io.call("write note", "pipe_file", self._path(dest, "SET_ASIDE.json"), note)
        return name, self.uri(dest), reason

    def sweep(self, keep_last: int, protect: set[str] | frozenset[str] = frozenset()) -> SetAside:
        """Retention: delete committed checkpoints beyond the newest ``keep_last``; move uncommitted ones aside.

        ``protect`` names checkpoints that must stay (the served version, a candidate
        being judged). Set-aside directories beyond the newest ``keep_set_aside`` are deleted.
        """
        out = SetAside()
        committed = [r.name for r in self.list()]
        keep = set(committed[-keep_last:]) if keep_last > 0 else set()
        keep |= set(protect)
        for name in self._step_dirs():
            if name in keep:
                continue
            if name in committed:
                self.fs.invalidate_cache()
                self.io.call("delete", "rm", self._path(name), recursive=True)
                out.removed.append(name)
            else:
                out.moved.append(self.set_aside(name, "no manifest: a write that never committed"))
        out.removed += self._trim_set_aside()
        return out

    def _trim_set_aside(self) -> list[str]:
        base = self._path(SET_ASIDE)
        if not self.io.call("exists", "exists", base):
            return []
        def age(n: str) -> tuple[int, str]:  # when it was set aside (ms), then the step: several can share a millisecond
            ms = n.rsplit(".", 1)[-1]
            return (int(ms) if ms.isdigit() else 0), n

        entries = sorted((p.rstrip("/").rsplit("/", 1)[-1] for p in self.io.call("list", "ls", base, detail=False)), key=age)
        old = entries[: max(0, len(entries) - self.keep_set_aside)]
        for name in old:
            self.io.call("delete", "rm", f"{base}/{name}", recursive=True)
        return [f"{SET_ASIDE}/{n}" for n in old]
