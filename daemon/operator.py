"""What the admin API's actions do to the run (daemon/admin.py authenticates and queues them).

The supervisor's loop calls ``Operator`` between steps, so an action sees the
stages at rest: no step, checkpoint or promotion is half done. Pausing stops
training only: ingest fills its bounded queue and waits, verdicts still arrive,
serving keeps answering. A pause survives a restart (``<run_dir>/PAUSED.json``)
until ``everlearn resume``.
"""

import json
import time
from pathlib import Path
from typing import Any

from everlearn.daemon.admin import AdminError
from everlearn.errors import CheckpointError, StorageUnavailable

PAUSED = "PAUSED.json"


def read_paused(run_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((run_dir / PAUSED).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {"reason": f"{PAUSED} is unreadable; `everlearn resume` clears it"}
    return doc if isinstance(doc, dict) else {"reason": str(doc)}


class Operator:
    def __init__(self, daemon):
        self.d = daemon

    def __call__(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        reason = body.get("reason") or f"{action} by an operator"
        if not isinstance(reason, str) or len(reason) > 1000:
            raise AdminError(400, "'reason' must be a string of at most 1000 characters")
        return getattr(self, action)(body, reason)

    def pause(self, body: dict[str, Any], reason: str) -> dict[str, Any]:
        d = self.d
        if d.paused is None:
            d.paused = {"since_unix": time.time(), "step": d.step, "reason": reason}
            (d.run_dir / PAUSED).write_text(json.dumps(d.paused))
            d.metrics.paused.set(1)
            d.state = f"paused: {reason}"  # /status says so as soon as the call answers, not from the loop's next turn
            d.progress.event("paused", step=d.step, reason=reason[:300])
        return {"paused": True, **d.paused}

    def resume(self, body: dict[str, Any], reason: str) -> dict[str, Any]:
        d = self.d
        was = d.paused
        if was is not None:
            (d.run_dir / PAUSED).unlink(missing_ok=True)
            d.paused = None
            d.metrics.paused.set(0)
            d.progress.event("resumed_training", step=d.step, paused_s=round(time.time() - was.get("since_unix", time.time()), 1))
        return {"paused": False, "step": d.step, "was_paused": was is not None}

    def rollback(self, body: dict[str, Any], reason: str) -> dict[str, Any]:
        version = body.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise AdminError(400, f"'version' must be an integer or null (the version before the served one), got {version!r}")
        try:
            record = self.d.promote.rollback(version, reason)
            self.d.monitors.after_rollback()
            return record
        except ValueError as e:
            raise AdminError(409, str(e)) from None
        except (LookupError, CheckpointError) as e:
            raise AdminError(404, str(e)) from None

    def promote(self, body: dict[str, Any], reason: str) -> dict[str, Any]:
        step = body.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise AdminError(400, f"'step' must be the non-negative step of a committed checkpoint, got {step!r}")
        d = self.d
        try:
            refs = {r.step: r for r in d.store.list()}
        except StorageUnavailable as e:
            raise AdminError(503, f"the checkpoint store did not answer ({e}); try again") from None
        ref = refs.get(step)
        if ref is None:
            raise AdminError(404, f"no committed checkpoint at step {step}; committed steps: {sorted(refs)[-20:]}")
        try:
            d.store.verify(ref)
            record = d.promote.promote_manual(ref, reason)
            if record.get("verdict") == "promoted" and not record.get("reverted"):  # it serves: the anchor policy counts it
                d.judge.promoted(d.promote.served)
            d.monitors.after_promotion(record)
            return record
        except ValueError as e:
            raise AdminError(409, str(e)) from None
        except CheckpointError as e:
            raise AdminError(409, f"checkpoint {ref.name} does not verify ({e}); it cannot serve") from None
