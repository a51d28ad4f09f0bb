"""The promote stage: the served record, the swap into serving, reverts, and the audit of each.

``SERVED.json`` beside the checkpoints is the commit point of a promotion: the
version serving must hold, the next version number (never reused), the
versions before it (to revert to) and the decision that promoted it. Order:

    1. SERVED.json names the new version      <- a promotion has happened
    2. the audit log records it (fsynced)
    3. serving swaps to it

A crash after 1 leaves serving to come up on the new version at restart, and
``open`` appends the audit record a crash after 1 lost (marked ``recovered``),
so the audit never misses a promotion. A crash before 1 changes nothing. A
version serving cannot load is reverted: SERVED.json goes back to the version
before, serving swaps back, and the audit says why.
"""

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from everlearn import failpoints
from everlearn.deploy.audit import AuditLog
from everlearn.deploy.deployment import Server
from everlearn.deploy.gates import GateResult
from everlearn.deploy.judge import Judgement
from everlearn.deploy.serve_config import ServeConfig
from everlearn.errors import CheckpointError, ServingError, StorageUnavailable
from everlearn.learners import CheckpointRef, CheckpointStore, ModelConfig
from everlearn.learners.learner import WEIGHTS

SERVED = "SERVED.json"
HISTORY = 16  # earlier promoted versions remembered for reverts and rollbacks
RECORD_KEYS = ("version", "uri", "name", "step", "manifest_sha256", "promoted_unix")


def served_record(version: int, ref: CheckpointRef) -> dict[str, Any]:
    return {"version": version, **ref.to_dict(), "promoted_unix": time.time()}


class PromoteStage:
    def __init__(self, store: CheckpointStore, model: ModelConfig, serve: ServeConfig, audit: AuditLog, metrics,
                 events: Callable[..., None]):
        self.store, self.model_cfg, self.serve_cfg = store, model, serve
        self.audit, self.metrics, self.events = audit, metrics, events
        self.served: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.next_version = 1
        self.server: Server | None = None

    # -- the served record -----------------------------------------------------
    def _write(self, decision: dict[str, Any] | None = None) -> None:
        doc = {**self.served, "next_version": self.next_version, "history": self.history[:HISTORY]}
        if decision is not None:
            doc["decision"] = decision
        self.store.write_root(SERVED, json.dumps(doc, default=str).encode())

    def _read(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.store.read_root(SERVED))
        except FileNotFoundError:
            return None
        except ValueError:
            self.events("warning", message=f"{SERVED} is unreadable; falling back to the checkpoint's record")
            return None
        return doc if isinstance(doc, dict) and "version" in doc else None

    def store_of(self, ref: CheckpointRef) -> CheckpointStore:
        """The store that holds ``ref``: the run's, or one beside it (anneal branches: <checkpoints>/branches)."""
        if ref.store_url == self.store.uri(ref.name).rsplit("/", 1)[0]:
            return self.store
        return CheckpointStore(ref.store_url, self.store.storage_options, timeout_s=self.store.timeout_s)

    def _verifies(self, record: dict[str, Any]) -> bool:
        try:
            ref = CheckpointRef.from_dict(record)
            self.store_of(ref).verify(ref)
            return True
        except StorageUnavailable:
            raise
        except (CheckpointError, KeyError, ValueError):
            return False

    def open(self, initial: CheckpointRef | None = None, fallback: dict[str, Any] | None = None) -> bool:
        """Load the served record (or make ``initial`` version 0), repair it, and settle the audit.

        False when there is nothing to open yet: no SERVED.json, no ``fallback`` record, no ``initial``.
        """
        doc = self._read() or fallback
        if doc is None:
            if initial is None:
                return False
            self.served, self.history, self.next_version = served_record(0, initial), [], 1
            self._write()
            return True
        self.served = {k: doc[k] for k in RECORD_KEYS if k in doc}
        self.history = list(doc.get("history", []))
        self.next_version = int(doc.get("next_version", int(doc["version"]) + 1))
        self._settle_audit(doc.get("decision"))
        if not self._verifies(self.served):
            self._fall_back()
        return True

    def _settle_audit(self, decision: dict[str, Any] | None) -> None:
        """Append the promotion record that a crash between SERVED.json and the audit lost."""
        version = self.served.get("version")
        if not version and not (decision and decision.get("decision_id")):  # version 0 is the initial one, unless rolled back to
            return
        tail = self.audit.tail()
        if decision and decision.get("decision_id"):  # a rollback or manual promotion: its own record, by id
            done = any(r.get("decision_id") == decision["decision_id"] for r in tail)
        else:
            done = any(r.get("promoted_version") == version or (r.get("verdict") == "reverted" and r.get("reverted_version") == version)
                       for r in tail)
        if not done:
            record = dict(decision or {"verdict": "promoted", "step": self.served.get("step")})
            record.update(promoted_version=version, recovered=True)
            self.audit.append(record)
            self.events("audit_recovered", version=version)

    def _fall_back(self) -> None:
        bad = self.served
        for record in self.history:
            if not record.get("rolled_back") and self._verifies(record):  # never fall back onto a version an operator rolled back
                self.served = {k: record[k] for k in RECORD_KEYS if k in record}
                self.history = [r for r in self.history if r is not record]
                reason = f"served version {bad.get('version')} ({bad.get('uri')}) no longer verifies"
                self.audit.append({"verdict": "reverted", "reverted_version": bad.get("version"),
                                   "serving_version": self.served["version"], "reason": reason})
                self._write()
                self.events("reverted", version=bad.get("version"), to=self.served["version"], reason=reason)
                return
        raise CheckpointError(f"served version {bad.get('version')} at {bad.get('uri')} does not verify and no earlier "
                              "promoted version does; restore the checkpoint, or start a new run_dir")

    def protect(self, keep_promoted: int = 1) -> set[str]:
        """Checkpoints the store must keep: the served version and the ``keep_promoted`` versions before it
        (a revert goes back to the first; ``everlearn rollback`` may go back to any of them)."""
        names = {self.served.get("name")} | {r.get("name") for r in self.history[: max(1, keep_promoted)]}
        return {n for n in names if n}

    # -- operator actions (daemon/admin.py) ---------------------------------------
    def rollback(self, version: int | None, reason: str, trigger: str = "manual", details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Serve an earlier promoted version again (its exact weights: same checkpoint, same manifest sha256).

        ``version`` None: the newest promoted version older than the served one. The served
        version moves into the history, so rolling back to it later is possible too.
        """
        target = self._rollback_target(version)
        if not self._verifies(target):
            raise LookupError(f"version {target['version']}'s checkpoint {target.get('uri')} no longer verifies (swept or damaged); "
                              "roll back to another version (raise checkpoint.keep_promoted to keep more of them)")
        previous = dict(self.served)
        self.served = {k: target[k] for k in RECORD_KEYS if k in target}
        self.history = [{**previous, "rolled_back": True}, *(r for r in self.history if r is not target)][:HISTORY]
        record = {"verdict": "rolled_back", "trigger": trigger, "decision_id": uuid.uuid4().hex, "rolled_back_from": previous["version"],
                  "serving_version": self.served["version"], "step": self.served.get("step"), "candidate": CheckpointRef.from_dict(self.served).to_dict(),
                  "manifest_sha256": self.served.get("manifest_sha256"), "reason": reason, **({"details": details} if details else {})}
        self._write(decision=record)  # the commit point, as for a promotion
        self.audit.append(record)
        self.metrics.serving_rollbacks.labels(trigger).inc()
        self.events("rolled_back", version=previous["version"], to=self.served["version"], trigger=trigger, reason=reason[:300])
        self.publish()
        if self.server is not None:
            try:
                record["swap_seconds"] = round(self.server.swap(self.served), 4)
            except ServingError as e:
                self._revert(previous, str(e))
                record["reverted"] = True
        return record

    def promote_manual(self, ref: CheckpointRef, reason: str) -> dict[str, Any]:
        """Serve the committed checkpoint ``ref`` without a judgement (an operator's decision, audited as such)."""
        if ref.manifest_sha256 == self.served.get("manifest_sha256"):
            raise ValueError(f"checkpoint {ref.name} is already serving as version {self.served['version']}")
        j = Judgement(ref.step, ref, dict(self.served), "promoted", GateResult(True, f"manual promotion: {reason}"))
        record = {"step": ref.step, "candidate": ref.to_dict(), "serving": CheckpointRef.from_dict(self.served).to_dict(),
                  "serving_version": self.served["version"], "verdict": "promoted", "passed": True, "manual": True,
                  "reason": j.result.reason, "metrics": {}, "decision_id": uuid.uuid4().hex}
        return self.promote(j, record)

    def _rollback_target(self, version: int | None) -> dict[str, Any]:
        served = self.served.get("version")
        known = sorted({int(r["version"]) for r in self.history if "version" in r})
        if version is None:
            older = [r for r in self.history if int(r.get("version", -1)) < served]
            if not older:
                raise LookupError(f"no promoted version older than the served version {served} is remembered; nothing to roll back to")
            return max(older, key=lambda r: int(r["version"]))
        if version == served:
            raise ValueError(f"version {version} is already serving")
        for r in self.history:
            if int(r.get("version", -1)) == version:
                return r
        raise LookupError(f"version {version} is not among the remembered promoted versions {known}; pick one of them")

    # -- serving -----------------------------------------------------------------
    def start_serving(self) -> None:
        """Start the deployment on the served version; returns while replicas start (``wait_serving``)."""
        self.publish()
        if self.serve_cfg.enabled and self.server is None:
            self.server = Server(self.model_cfg, self.serve_cfg, self.store.url, self.store.storage_options)
            self.server.start(self.served, wait=False)

    def wait_serving(self) -> None:
        if self.server is not None:
            self.server.wait_for_version(self.served["version"], self.serve_cfg.start_timeout_s)

    def publish(self) -> None:
        self.metrics.served_version.set(self.served["version"])
        self.metrics.served_step.set(self.served["step"])
        self.metrics.served_promoted.set(self.served.get("promoted_unix") or 0)

    def promote(self, j: Judgement, record: dict[str, Any]) -> dict[str, Any]:
        """Make ``j.candidate`` the served version (the order in the module docstring); returns the audit record."""
        failpoints.hit("promote.before_record")
        previous, version = dict(self.served), self.next_version
        self.served, self.next_version = served_record(version, j.candidate), version + 1
        self.history = [previous, *self.history][:HISTORY]
        record = {**record, "promoted_version": version}
        try:
            self._write(decision=record)
        except Exception as e:  # noqa: BLE001 the commit point was not reached: nothing happened, whatever the error
            self.served, self.next_version, self.history = previous, version, self.history[1:]
            failed = {**record, "verdict": "failed", "passed": True, "promoted_version": None,
                      "reason": f"passed, but {SERVED} could not be written ({type(e).__name__}: {e}); serving unchanged"}
            self.audit.append(failed)
            self.metrics.gate_decisions.labels("failed").inc()
            self.events("promotion_failed", step=j.step, error=str(e)[:300])
            return failed
        failpoints.hit("promote.after_record")
        self.audit.append(record)
        self.metrics.promotions.inc()
        self.metrics.gate_decisions.labels("promoted").inc()
        failpoints.hit("promote.after_audit")
        if failpoints.hit("promote.before_swap") == "damage":  # tests: a version serving cannot load
            store = self.store_of(j.candidate)
            store.fs.pipe_file(f"{store.root}/{j.candidate.name}/{WEIGHTS}", b"damaged after judging")
        self.publish()
        if self.server is not None:
            try:
                swap_s = self.server.swap(self.served)
                self.metrics.swap_seconds.observe(swap_s)
                record["swap_seconds"] = round(swap_s, 4)
            except ServingError as e:
                self._revert(previous, str(e))
                record["reverted"] = True
        failpoints.hit("promote.after_swap")
        return record

    def _revert(self, previous: dict[str, Any], why: str) -> None:
        bad = self.served
        self.served = previous
        self.history = [r for r in self.history if r.get("name") != previous.get("name") or r.get("version") != previous.get("version")]
        self._write()
        reason = f"serving could not load version {bad['version']}: {why}"
        self.audit.append({"verdict": "reverted", "reverted_version": bad["version"], "serving_version": previous["version"], "reason": reason})
        self.metrics.promotions_reverted.inc()
        self.events("reverted", version=bad["version"], to=previous["version"], reason=reason[:300])
        self.publish()
        try:
            self.server.swap(previous)
        except ServingError as e:  # the old replicas never stopped serving it; report and go on
            self.events("warning", message=f"serving did not confirm the revert to version {previous['version']}: {e}")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served, "next_version": self.next_version}
