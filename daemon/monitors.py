"""What the supervisor watches between steps: drift (and its responses) and each promoted version after its swap.

* Drift (daemon/drift.py): the ingest thread feeds the stream's tokens; after
  every judgement the serving version's loss on fresh held-out sequences it had
  not scored before feeds Page-Hinkley. Each step the monitor is checked; an
  event is logged, counted and answered per ``drift.response``: a judgement at
  once, the replay boost restarted, the learning rate scaled for
  ``buffer.boost_steps`` steps. A promotion refreshes the reference.
* Post-swap watch (deploy/watch.py): after a promotion, the held-out sequences
  that arrive are scored by the new and the previous version (asynchronously,
  on the evaluator), and serving's error rate is followed; a regression rolls
  serving back by itself.
"""

import hashlib
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError

from everlearn.deploy.watch import PostSwapWatch, Verdict
from everlearn.learners import CheckpointRef

SEEN_LOSSES = 8192  # sequence keys whose serving loss already fed Page-Hinkley (bounded; older ones may count twice)


class Monitors:
    def __init__(self, daemon):
        self.d = daemon
        self.watch = PostSwapWatch(daemon.cfg.watch)
        self._judged: tuple[int, dict[str, Any], Any] | None = None  # (step, serving record, evidence) of the judgement in flight
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._pending: tuple[Any, Any, np.ndarray, np.ndarray, float] | None = None  # a watch check in flight
        self.judge_now = False
        self._idle_since: float | None = None
        self._judged_step = -1  # the step of the last candidate submitted to the judge

    # -- drift -------------------------------------------------------------------
    def judged(self, step: int, serving: dict[str, Any], evidence) -> None:
        self._judged = (step, dict(serving), evidence)
        self._judged_step = step

    def quiet(self, now: float) -> bool:
        """The stream delivered nothing this turn: True once the steps since the last judgement have waited
        ``gate.idle_judge_s``, so a stream gone quiet does not leave its last partial interval unjudged."""
        d = self.d
        self._idle_since = self._idle_since or now
        due = (d.step > max(self._judged_step, 0) and now - self._idle_since >= d.cfg.gate.idle_judge_s and d.judge.pending is None)
        if due:
            d.progress.event("idle_judgement", step=d.step, idle_s=round(now - self._idle_since, 1))
        return due

    def flowing(self) -> None:
        """The stream delivered: the quiet period, if any, is over."""
        self._idle_since = None

    def after_verdict(self, j) -> None:
        """Feed serving's loss on the judged fresh sequences it had not scored before to Page-Hinkley."""
        judged, self._judged = self._judged, None
        drift = self.d.ingest.drift
        if drift is None or judged is None or judged[0] != j.step or j.verdict not in ("promoted", "rejected"):
            return
        _, serving, ev = judged
        keys = [hashlib.blake2b(ev.fresh_tokens[i, : ev.fresh_lengths[i]].tobytes(), digest_size=16).digest() for i in range(len(ev.fresh_tokens))]
        new = [i for i, k in enumerate(keys) if k not in self._seen]
        if not new:
            return
        try:  # scored by the judgement already: answered from the evaluator's scores
            sums, counts = ray.get(self.d.judge.scores(CheckpointRef.from_dict(serving), ev.fresh_tokens[new], ev.fresh_lengths[new]), timeout=60)
        except Exception as e:  # noqa: BLE001 a lost sample of the loss test, never a stop
            self.d.progress.event("warning", message=f"serving's held-out losses for drift were not available: {type(e).__name__}")
            return
        for i in new:
            self._seen[keys[i]] = None
        while len(self._seen) > SEEN_LOSSES:
            self._seen.popitem(last=False)
        drift.observe_losses((np.asarray(sums) / np.maximum(np.asarray(counts), 1)).tolist())

    def after_step(self) -> None:
        """Check drift (microseconds) and answer its events."""
        drift, d = self.d.ingest.drift, self.d
        if drift is None:
            return
        for event in drift.check():
            d.metrics.drift_events.labels(event.kind).inc()
            d.progress.event("drift_detected", step=d.step, **{k: v for k, v in event.to_dict().items() if k != "kind"}, drift=event.kind)
            response = d.cfg.drift.response
            if response.judge_now:
                self.judge_now = True
            if response.replay_boost:
                d.train.mixer.schedule.restart_boost(d.step)
            if response.lr_scale != 1.0:
                d.train.scale_lr(response.lr_scale, d.cfg.buffer.boost_steps)
        stats = drift.stats()
        for gauge, key in ((d.metrics.drift_psi, "psi"), (d.metrics.drift_js, "js"), (d.metrics.drift_page_hinkley, "page_hinkley")):
            gauge.set(stats[key] if stats[key] is not None else float("nan"))
        d.metrics.drift_active.set(1 if stats["data_drift"] else 0)

    # -- promotions and the post-swap watch --------------------------------------------
    def after_promotion(self, record: dict[str, Any]) -> None:
        """A version now serves (gated or manual): refresh the drift reference, start watching it."""
        if record.get("verdict") != "promoted" or record.get("reverted"):
            return
        d = self.d
        if d.ingest.drift is not None:
            d.ingest.drift.refresh()
        previous = d.promote.history[0] if d.promote.history else None
        if previous is not None:
            self._pending = None
            self.watch.begin(d.promote.served, previous, d.ingest.holdout.added, self._request_counts())
            d.metrics.watch_version.set(d.promote.served["version"])

    def after_rollback(self) -> None:
        self._end()

    def resume(self) -> None:
        """At start: a version promoted less than ``watch.window_s`` ago is watched for the rest of its window."""
        d, served = self.d, self.d.promote.served
        age = time.time() - float(served.get("promoted_unix") or 0)
        if served.get("version") and d.promote.history and age < d.cfg.watch.window_s:
            self.watch.begin(served, d.promote.history[0], d.ingest.holdout.added, self._request_counts())
            self.watch.active.started -= age
            d.metrics.watch_version.set(served["version"])

    def tick(self) -> None:
        """One step of the watch: collect a check in flight, end an expired window, or start a due check."""
        w, d = self.watch.active, self.d
        if w is None:
            return
        if self._pending is not None:
            self._collect()
            return
        if self.watch.expired():
            ended = self._end()
            d.promote.audit.append({"verdict": "watched", "serving_version": ended.served["version"], "checks": ended.checks,
                                    "reason": f"no regression within watch.window_s={d.cfg.watch.window_s} s of the swap"})
            d.progress.event("watch_passed", version=ended.served["version"], checks=len(ended.checks))
            return
        if not self.watch.due():
            return
        counts = self._request_counts()
        if counts is not None:
            verdict = self.watch.error_verdict(*counts)
            if verdict is not None and self._judge_verdict(verdict, "errors"):
                return
        tokens, lengths, docs = d.ingest.holdout_since(w.mark)
        if len(set(docs.tolist())) < d.cfg.watch.min_documents:
            return
        new, old = (d.judge.scores(CheckpointRef.from_dict(r), tokens, lengths) for r in (w.served, w.previous))
        self._pending = (new, old, lengths, docs, time.monotonic())

    def _collect(self) -> None:
        new, old, lengths, docs, t0 = self._pending
        try:
            (new_sums, counts), (old_sums, _) = ray.get([new, old], timeout=0.01)
        except GetTimeoutError:
            if time.monotonic() - t0 > self.d.cfg.gate.timeout_s:
                self._pending = None  # the evaluator is stuck; the judge's timeout restarts it
            return
        except Exception as e:  # noqa: BLE001 e.g. the previous version's checkpoint is gone: no comparison, no rollback
            self._pending = None
            self.d.progress.event("warning", message=f"post-swap check failed: {type(e).__name__}: {str(e)[:200]}")
            return
        self._pending = None
        verdict = self.watch.loss_verdict(np.asarray(new_sums), np.asarray(old_sums), np.asarray(counts), docs)
        if verdict is not None:
            self._judge_verdict(verdict, "loss")

    def _judge_verdict(self, verdict: Verdict, what: str) -> bool:
        """Record a check; roll back on a regression (True when it did)."""
        w, d = self.watch.active, self.d
        w.checks.append({"check": what, "regressed": verdict.regressed, **verdict.numbers})
        del w.checks[:-8]  # the audit keeps the last few
        if not verdict.regressed:
            return False
        self._end()
        try:
            d.promote.rollback(w.previous["version"], f"post-swap {what} regression of version {w.served['version']}: {verdict.reason}",
                               trigger="auto", details={"check": what, **verdict.numbers})
        except (LookupError, ValueError) as e:  # the previous version is gone or already serving: say so, keep serving
            d.progress.event("warning", message=f"automatic rollback of version {w.served['version']} not possible: {e}")
        return True

    def _end(self):
        self._pending = None
        self.d.metrics.watch_version.set(0)
        return self.watch.end()

    def _request_counts(self) -> tuple[int, int] | None:
        server = self.d.promote.server
        counts = getattr(server, "request_counts", None)
        if counts is None:
            return None
        try:
            return counts()
        except Exception:  # noqa: BLE001 serving's counters are advisory here
            return None

    def status(self) -> dict[str, Any]:
        w = self.watch.active
        drift = self.d.ingest.drift
        return {"drift": drift.stats() if drift is not None else None,
                "watch": None if w is None else {"version": w.served.get("version"), "previous": w.previous.get("version"),
                                                 "checks": len(w.checks), "last": w.checks[-1] if w.checks else None}}
