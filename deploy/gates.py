"""Gates: a candidate checkpoint serves only if it learned the new data without forgetting the old.

Both losses are measured on documents no model ever trained on: the *fresh*
window holds the newest held-out documents, the *old* window a uniform
reservoir of held-out documents that have aged out of the fresh one.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from everlearn.learners import CheckpointRef


class GateConfig(BaseModel):
    """When candidates are judged and what they must show to be promoted."""

    model_config = ConfigDict(extra="forbid")

    every_steps: int = Field(50, ge=1, description="Judge a candidate every this many optimizer steps (a checkpoint is written for it).")  # ~30 s of the demo model on 2 cores
    min_improvement: float = Field(0.01, ge=0, le=1, description="Candidate's loss on fresh held-out documents must be at most (1 - this) x the serving model's. 1 = can never pass.")  # 1 %: above step-to-step noise of the window
    max_forgetting: float = Field(0.02, ge=0, description="Candidate's loss on old held-out documents may be at most (1 + this) x the serving model's.")  # 2 % rise tolerated
    min_fresh_sequences: int = Field(4, ge=1, description="Do not judge until the fresh window holds at least this many sequences.")
    max_eval_sequences: int = Field(64, ge=1, description="Sequences from each window a judgement evaluates (bounds its cost).")
    evaluator_threads: int = Field(1, ge=1, description="Torch threads of the evaluator actor that judges candidates beside the learner.")  # leaves the learner its cores
    evaluator_num_cpus: float = Field(0.0, ge=0, description="CPUs the evaluator actor reserves in Ray.")  # 0: it shares the local cores, judging is brief
    timeout_s: float = Field(600.0, gt=0, description="A judgement that takes longer fails (the evaluator is restarted); the next interval tries again.")


@dataclass(frozen=True)
class Evidence:
    """Held-out sequences (tokens padded to a common length, true lengths) for one judgement."""

    fresh_tokens: np.ndarray
    fresh_lengths: np.ndarray
    old_tokens: np.ndarray
    old_lengths: np.ndarray


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Gate(Protocol):
    def evaluate(self, candidate: CheckpointRef, serving: CheckpointRef, evidence: Evidence) -> GateResult: ...


LossFn = Callable[[CheckpointRef, np.ndarray, np.ndarray], float]


class LossGate:
    """Improvement on fresh data, bounded forgetting on old data, finite losses."""

    def __init__(self, cfg: GateConfig, loss_fn: LossFn):
        self.cfg = cfg
        self.loss_fn = loss_fn

    def evaluate(self, candidate: CheckpointRef, serving: CheckpointRef, evidence: Evidence) -> GateResult:
        m: dict[str, Any] = {
            "fresh_sequences": len(evidence.fresh_tokens),
            "old_sequences": len(evidence.old_tokens),
            "candidate_fresh_loss": self.loss_fn(candidate, evidence.fresh_tokens, evidence.fresh_lengths),
            "serving_fresh_loss": self.loss_fn(serving, evidence.fresh_tokens, evidence.fresh_lengths),
        }
        has_old = len(evidence.old_tokens) > 0
        if has_old:
            m["candidate_old_loss"] = self.loss_fn(candidate, evidence.old_tokens, evidence.old_lengths)
            m["serving_old_loss"] = self.loss_fn(serving, evidence.old_tokens, evidence.old_lengths)
        losses = [v for k, v in m.items() if k.endswith("_loss")]
        if not all(math.isfinite(v) for v in losses):
            return GateResult(False, "sanity: a loss is not finite", m)
        bound = m["serving_fresh_loss"] * (1.0 - self.cfg.min_improvement)
        m["fresh_bound"] = bound
        if m["candidate_fresh_loss"] > bound:
            return GateResult(
                False,
                f"improvement: fresh loss {m['candidate_fresh_loss']:.4f} > {bound:.4f} "
                f"(serving {m['serving_fresh_loss']:.4f} x (1 - {self.cfg.min_improvement}))",
                m,
            )
        if has_old:
            old_bound = m["serving_old_loss"] * (1.0 + self.cfg.max_forgetting)
            m["old_bound"] = old_bound
            if m["candidate_old_loss"] > old_bound:
                return GateResult(
                    False,
                    f"forgetting: old loss {m['candidate_old_loss']:.4f} > {old_bound:.4f} "
                    f"(serving {m['serving_old_loss']:.4f} x (1 + {self.cfg.max_forgetting}))",
                    m,
                )
        note = "" if has_old else " (no old held-out data yet: forgetting not measured)"
        return GateResult(True, f"passed: fresh {m['candidate_fresh_loss']:.4f} <= {bound:.4f}{note}", m)
