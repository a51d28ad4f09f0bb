"""Post-swap monitoring: a promoted version that regresses on the live stream is rolled back by itself.

The gates judged the candidate on held-out documents that existed before the
promotion. For ``watch.window_s`` after it, documents that arrive later and are
held out (no model trained on them) are scored by the new version and by the
one it replaced, paired, and requests' error rate is followed. When the new
version is worse beyond ``watch.max_loss_increase`` with confidence (the lower
bound of the paired loss ratio, a document bootstrap as in the gates), or its
requests fail beyond ``watch.max_error_rate``, the daemon rolls serving back to
the version before it (exact weights, audited with these numbers). A window
that ends without a regression ends the watch.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from everlearn.deploy.bootstrap import ratio_bounds


class WatchConfig(BaseModel):
    """Watching a promoted version on the live stream, and rolling it back when it regresses."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Watch each promoted version for window_s and roll it back automatically when it regresses.")
    window_s: float = Field(900.0, gt=0, description="How long after a promotion the new version is watched.")  # 15 min: at the demo's rate ~100 held-out documents arrive
    check_every_s: float = Field(15.0, gt=0, description="Seconds between checks while a version is watched.")  # a check costs one forward pass per new held-out sequence, cached across checks
    min_documents: int = Field(4, ge=1, description="Held-out documents that arrived after the swap needed before the loss is compared.")  # fewer: one odd document decides
    max_loss_increase: float = Field(0.05, ge=0, description="Roll back when the new version's loss on those documents is, with confidence, more than (1 + this) x the previous version's.")  # 5 %: above the gates' 2 % forgetting tolerance, so a version that passed them is not undone by noise
    confidence: float = Field(0.95, gt=0.5, lt=1, description="One-sided confidence of the loss comparison (document bootstrap).")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap replicates of the loss comparison.")  # bounds stable to ~0.01 at 1000
    max_error_rate: float = Field(0.05, ge=0, le=1, description="Roll back when more than this share of the serving requests since the swap failed (5xx).")  # 5 %: a healthy replica fails ~none
    min_requests: int = Field(50, ge=1, description="Requests since the swap needed before the error rate counts.")
    seed: int = Field(0, description="Seed of the bootstrap.")


@dataclass
class Watched:
    """One promotion under watch."""

    served: dict[str, Any]
    previous: dict[str, Any]
    mark: int  # the held-out window's position at the swap: later sequences are the live evidence
    started: float
    counts: tuple[int, int] | None = None  # serving (requests, errors) at the swap
    last_check: float = -math.inf
    checks: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    regressed: bool
    reason: str
    numbers: dict[str, Any]


class PostSwapWatch:
    def __init__(self, cfg: WatchConfig, clock=time.monotonic):
        self.cfg, self.clock = cfg, clock
        self.active: Watched | None = None

    def begin(self, served: dict[str, Any], previous: dict[str, Any], mark: int, counts: tuple[int, int] | None = None) -> None:
        """Watch ``served`` (just promoted over ``previous``) from the held-out position ``mark``."""
        self.active = Watched(dict(served), dict(previous), mark, self.clock(), counts) if self.cfg.enabled else None

    def end(self) -> Watched | None:
        watched, self.active = self.active, None
        return watched

    def expired(self) -> bool:
        return self.active is not None and self.clock() - self.active.started >= self.cfg.window_s

    def due(self) -> bool:
        """Whether a check is due now (and marks it done: one check per ``check_every_s``)."""
        w = self.active
        if w is None or self.clock() - w.last_check < self.cfg.check_every_s:
            return False
        w.last_check = self.clock()
        return True

    def loss_verdict(self, new_sums: np.ndarray, old_sums: np.ndarray, counts: np.ndarray, documents: np.ndarray) -> Verdict | None:
        """Paired per-sequence loss sums of the new and previous version on live held-out sequences (None: too few documents)."""
        n_docs = len(set(np.asarray(documents).tolist()))
        if n_docs < self.cfg.min_documents:
            return None
        rng = np.random.default_rng([self.cfg.seed, len(documents)])
        bounds = ratio_bounds(new_sums, old_sums, documents, samples=self.cfg.bootstrap_samples, confidence=self.cfg.confidence, rng=rng)
        tokens = int(np.asarray(counts).sum())
        numbers = {"documents": n_docs, "sequences": len(documents), "tokens": tokens,
                   "new_loss": float(np.sum(new_sums) / max(tokens, 1)), "previous_loss": float(np.sum(old_sums) / max(tokens, 1)),
                   "ratio": bounds.to_dict(), "max_loss_increase": self.cfg.max_loss_increase, "confidence": self.cfg.confidence,
                   "bootstrap_samples": self.cfg.bootstrap_samples}
        increase = bounds.lower - 1.0
        regressed = math.isfinite(increase) and increase > self.cfg.max_loss_increase or not math.isfinite(numbers["new_loss"])
        reason = (f"loss on {n_docs} live held-out documents since the swap: {numbers['new_loss']:.4f} vs {numbers['previous_loss']:.4f} "
                  f"(ratio {bounds.estimate:.4f}, lower bound {bounds.lower:.4f} at {self.cfg.confidence:.0%}; "
                  f"rollback above 1 + {self.cfg.max_loss_increase})")
        return Verdict(bool(regressed), reason, numbers)

    def error_verdict(self, requests: int, errors: int) -> Verdict | None:
        """Serving's cumulative (requests, 5xx errors) now; compared with the counts at the swap (None: too few requests)."""
        w = self.active
        if w is None or w.counts is None:
            return None
        n, e = requests - w.counts[0], errors - w.counts[1]
        if n < self.cfg.min_requests:
            return None
        rate = e / n
        numbers = {"requests": n, "errors": e, "error_rate": rate, "max_error_rate": self.cfg.max_error_rate}
        return Verdict(rate > self.cfg.max_error_rate, f"{e} of {n} requests since the swap failed ({rate:.1%}; rollback above {self.cfg.max_error_rate:.1%})", numbers)
