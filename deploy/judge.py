"""The judge stage: candidates are judged by the evaluator actor, off the training path.

``submit`` hands a committed candidate, the serving version, the anchor and
the held-out evidence to the evaluator and returns at once; the supervisor
calls ``poll`` between training steps and gets the verdict when it is ready.
One judgement is in flight at a time (a gate interval that comes while one
runs is skipped). An evaluator that dies, raises or overruns ``gate.timeout_s``
yields a ``failed`` verdict and is restarted; serving is never touched by a
failure. A fresh window with too little evidence is ``skipped`` without
evaluating anything.

The anchor is the version forgetting is also bounded against, so that losses
each promotion is allowed cannot compound: the first served version the judge
sees, refreshed to the newly served one after every
``gate.anchor_refresh_promotions`` promotions (``promoted``, called by the
supervisor after each promotion; 0 = never). It lives in ``state_dict`` (a
restart keeps it; state from before anchors starts one at the served version),
and ``protect`` names its checkpoint, with the candidate being judged, so that
the store never sweeps them. An anchor whose checkpoint can no longer be used
is replaced by the serving version, with an event.
"""

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from everlearn.deploy.evaluator import Evaluator
from everlearn.deploy.gates import Evidence, GateConfig, GateResult, too_little_evidence
from everlearn.deploy.windows import OVERALL
from everlearn.learners import CheckpointRef, ModelConfig

ANCHOR_KEYS = ("version", "uri", "name", "step", "manifest_sha256")  # of a served record: enough to load and name it


@dataclass
class Judgement:
    """A verdict on ``candidate``: promoted (passed), rejected, skipped (too little evidence) or failed."""

    step: int
    candidate: CheckpointRef
    serving: dict[str, Any]  # the served record it was compared with
    verdict: str
    result: GateResult
    seconds: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)

    def audit_record(self, cfg: GateConfig) -> dict[str, Any]:
        return {"step": self.step, "candidate": self.candidate.to_dict(), "serving": CheckpointRef.from_dict(self.serving).to_dict(),
                "serving_version": self.serving["version"], "verdict": self.verdict, "passed": self.result.passed,
                "reason": self.result.reason, "metrics": self.result.metrics, "config": cfg.model_dump(),
                "judge_seconds": round(self.seconds, 4)}


def observe(metrics, m: dict[str, Any]) -> None:
    """Set the gate gauges from a verdict's metrics (``deploy/verdict.py``); what was not measured is left as it was."""
    for key, value in m.items():
        if key.endswith("_loss"):
            model, window, _ = key.split("_")
            metrics.gate_loss.labels(model, window).set(value)
    if "improvement" in m:
        metrics.gate_improvement_lower.set(m["improvement"]["lower"])
    for reference, table in m.get("forgetting", {}).items():
        overall = table["domains"].get(OVERALL, {})
        if overall.get("measured"):
            metrics.gate_forgetting_upper.labels(reference).set(overall["upper"])
    if m.get("behaviour", {}).get("kl") is not None:
        metrics.gate_kl.set(m["behaviour"]["kl"])


class JudgeStage:
    def __init__(self, cfg: GateConfig, model: ModelConfig, storage_options: dict[str, Any], metrics,
                 events: Callable[..., None], eval_batch_size: int = 16):
        self.cfg, self.model_cfg, self.storage_options = cfg, model, storage_options
        self.metrics, self.events, self.eval_batch_size = metrics, events, eval_batch_size
        self.evaluator = None
        self._pending: tuple[Judgement, Any, float] | None = None
        self.last: dict[str, Any] | None = None
        self.rejected_in_a_row = 0  # candidates refused since the last that passed (an alert's input)
        self.anchor: dict[str, Any] | None = None  # the served record forgetting is also bounded against
        self.promotions_since_anchor = 0

    def _evaluator(self):
        """The evaluator actor, started by the first judgement that needs it: a run that never reaches a gate
        never pays for one, and it never loads torch while the learner is starting."""
        if self.evaluator is None:
            self._spawn()
        return self.evaluator

    def _spawn(self) -> None:
        actor = ray.remote(Evaluator).options(num_cpus=self.cfg.evaluator_num_cpus, num_gpus=self.cfg.evaluator_num_gpus,
                                              resources=self.cfg.evaluator_resources, max_restarts=0)
        self.evaluator = actor.remote(self.model_cfg, self.storage_options, self.cfg.evaluator_threads, self.eval_batch_size,
                                      device="cuda" if self.cfg.evaluator_num_gpus > 0 else "cpu")

    def stop(self) -> None:
        if self.evaluator is not None:
            with contextlib.suppress(Exception):  # already dead is fine
                ray.kill(self.evaluator, no_restart=True)
            self.evaluator = None
        self._pending = None

    def restart(self, why: str) -> None:
        self.metrics.stage_restarts.labels("judge").inc()
        self.events("stage_restart", stage="judge", reason=why)
        self.stop()
        self._spawn()

    @property
    def pending(self) -> CheckpointRef | None:
        """The candidate being judged (the store keeps it until the verdict)."""
        return self._pending[0].candidate if self._pending else None

    def scores(self, ref: CheckpointRef, tokens, lengths):
        """Per-sequence (loss sums, token counts) of checkpoint ``ref``, from the evaluator (a Ray object ref to get).

        The evaluator keeps what it scored, so sequences a judgement already scored cost nothing.
        """
        return self._evaluator().scores.remote(ref, tokens, lengths)

    def protect(self) -> set[str]:
        """Checkpoints the store must keep for the judge: the anchor and the candidate being judged."""
        names = {(self.anchor or {}).get("name"), self.pending.name if self.pending else None}
        return {n for n in names if n}

    def promoted(self, served: dict[str, Any]) -> None:
        """``served`` (the new served record) was promoted: count it, and refresh the anchor when the policy says so."""
        self.promotions_since_anchor += 1
        every = self.cfg.anchor_refresh_promotions
        if self.anchor is None or (every and self.promotions_since_anchor >= every):
            self._set_anchor(served, "refreshed" if self.anchor is not None else "first served version")

    def _set_anchor(self, served: dict[str, Any], why: str) -> None:
        self.anchor = {k: served[k] for k in ANCHOR_KEYS if k in served}
        self.promotions_since_anchor = 0
        self.events("gate_anchor", version=self.anchor.get("version"), step=self.anchor.get("step"), reason=why)

    def submit(self, step: int, candidate: CheckpointRef, serving: dict[str, Any], evidence: Evidence) -> Judgement | None:
        """Start judging ``candidate``; a verdict that needs no evaluation (skipped) is returned at once."""
        if self._pending is not None:
            self.events("gate_busy", step=step, judging=self._pending[0].step)
            return None
        if self.anchor is None:
            self._set_anchor(serving, "first served version")
        j = Judgement(step, candidate, serving, "pending", GateResult(False, "pending"))
        counts = {w: evidence.counts(w) for w in ("fresh", "old")}
        why = too_little_evidence(self.cfg, counts["fresh"])
        if why is not None:
            j.verdict = "skipped"
            j.result = GateResult(False, why, {"evidence": counts, "gates": [{"name": "evidence", "passed": False, "reason": why}]})
            return self._done(j)
        ref = self._evaluator().judge.remote(self.cfg, candidate, CheckpointRef.from_dict(serving), evidence, dict(self.anchor))
        self._pending = (j, ref, time.monotonic())
        return None

    def poll(self, timeout: float = 0.0) -> Judgement | None:
        """The verdict of the judgement in flight, if it is ready (waits up to ``timeout``)."""
        if self._pending is None:
            return None
        j, ref, t0 = self._pending
        try:
            result: GateResult = ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            if time.monotonic() - t0 < self.cfg.timeout_s:
                return None
            j.verdict, j.result = "failed", GateResult(False, f"failed: the judgement took longer than gate.timeout_s={self.cfg.timeout_s}")
            self.restart("judgement timed out")
        except RayActorError as e:
            j.verdict, j.result = "failed", GateResult(False, f"failed: the evaluator died ({type(e).__name__})")
            self.restart("the evaluator actor died")
        except Exception as e:  # noqa: BLE001 e.g. a candidate that does not verify: a failed verdict, never a crash
            j.verdict, j.result = "failed", GateResult(False, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        else:
            j.result = result
            j.verdict = "promoted" if result.passed else "rejected"
            observe(self.metrics, result.metrics)
            if result.metrics.get("anchor", {}).get("unavailable"):
                self._set_anchor(j.serving, f"the anchor's checkpoint cannot be used: {result.metrics['anchor']['unavailable']}")
        j.seconds = time.monotonic() - t0
        self.metrics.judge_seconds.observe(j.seconds)
        self._pending = None
        return self._done(j)

    def _done(self, j: Judgement) -> Judgement:
        if j.verdict != "promoted":  # a passed gate is counted by promote once it has happened
            self.metrics.gate_decisions.labels(j.verdict).inc()
        failed = next((g["name"] for g in j.result.metrics.get("gates", []) if not g["passed"]), None)
        if j.verdict in ("rejected", "skipped") and failed is not None:
            self.metrics.gate_failures.labels(failed).inc()
        self.last = {"verdict": j.verdict, "step": j.step, "reason": j.result.reason}
        if j.verdict in ("rejected", "promoted"):  # skipped / failed judgements say nothing about the candidates
            self.rejected_in_a_row = self.rejected_in_a_row + 1 if j.verdict == "rejected" else 0
            self.metrics.gate_rejections_in_a_row.set(self.rejected_in_a_row)
        return j

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last, "anchor": self.anchor, "promotions_since_anchor": self.promotions_since_anchor,
                "rejected_in_a_row": self.rejected_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the last verdict and the anchor (state from before anchors has none: the next judgement sets one)."""
        self.last = state.get("last")
        self.anchor = state.get("anchor")
        self.promotions_since_anchor = int(state.get("promotions_since_anchor", 0))
        self.rejected_in_a_row = int(state.get("rejected_in_a_row", 0))
        self.metrics.gate_rejections_in_a_row.set(self.rejected_in_a_row)
        self._pending = None
