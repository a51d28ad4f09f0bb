"""What the daemon shows and records beside its checkpoints: the /status document, JSONL logs, the quarantine.

``quarantine.jsonl`` holds one record per skipped non-finite step: the step,
why, and every document of its batch with the token range and where the
source read it. The ids in it are refused (dead-lettered as ``quarantined``)
if the stream delivers them again, e.g. after a rollback re-reads them.
"""

import json
import os
from pathlib import Path
from typing import Any

QUARANTINE_TAIL_BYTES = 16 << 20  # at most ~100k documents remembered at start


class JsonlLog:
    """An append-only JSON-lines file (lineage, quarantine); each append is one flushed write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")


class Quarantine:
    """``quarantine.jsonl``, and the set of ids it names that ingest refuses (shared with the ingest stage)."""

    def __init__(self, path: Path, refused: set[str]):
        self.log, self.refused = JsonlLog(path), refused
        self.refused |= load_quarantined(path)

    def __call__(self, record: dict[str, Any]) -> None:
        """A skipped step's documents: recorded with provenance, and refused if the stream delivers them again."""
        self.log.append(record)
        self.refused.update(str(d["id"]) for d in record["documents"])


class Rate:
    """Tokens per second, smoothed over the last steps (an exponential moving average)."""

    def __init__(self, clock):
        self.clock, self.value, self._last = clock, 0.0, None

    def add(self, tokens: int) -> None:
        now = self.clock()
        if self._last is not None:
            rate = tokens / max(now - self._last, 1e-6)
            self.value = rate if self.value == 0 else 0.9 * self.value + 0.1 * rate
        self._last = now


def load_quarantined(path: Path) -> set[str]:
    """Document ids recorded in the quarantine file (its last 16 MiB)."""
    if not path.exists():
        return set()
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - QUARANTINE_TAIL_BYTES))
        data = f.read()
    ids: set[str] = set()
    for line in data.splitlines():
        try:
            ids.update(str(d["id"]) for d in json.loads(line)["documents"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn or cut line
    return ids


def compose_status(d) -> dict[str, Any]:
    """The /status document of a running ``Daemon`` ``d``: one snapshot of every stage."""
    train, served = d.train, d.promote.served
    last = train.last
    return {
        "state": d.state,
        "step": d.step,
        "learner": d.train.info,
        "tokens_per_s": round(d.rate.value, 1),
        "loss": last.loss if last else None,
        "lr": last.lr if last else None,
        "buffer": train.status(),
        "served_version": served.get("version"),
        "served_step": served.get("step"),
        "last_gate": d.judge.last,
        "judging_step": d.judge.pending.step if d.judge.pending else None,
        "branch": d.branch.status(),
        "last_checkpoint": d.last_checkpoint.name if d.last_checkpoint else None,
        "serving_url": d.promote.server.url if d.promote.server else None,
        "resumed_from_step": d.resumed_from.step if d.resumed_from else None,
        "degraded": d.health(),
        "restarts": dict(d.restarts),
        "paused": d.paused,
        **d.monitors.status(),
        **d.ingest.status(),
        **d.counters,
    }
