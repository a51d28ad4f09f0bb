"""Gates: a candidate checkpoint serves only if it learned the new data, forgot nothing old, and still behaves.

Every loss is measured on documents no model ever trained on: the *fresh*
window holds the newest held-out documents, the *old* windows uniform
reservoirs, one per domain, of held-out documents that aged out of the fresh
one; the *probes* are a fixed set of held-out sequences, frozen when first seen.
The models are compared on the same sequences (paired), and every comparison is
judged by a one-sided confidence bound from a document-level bootstrap
(``deploy/bootstrap.py``), never by two point estimates: a candidate whose
point estimate is better by chance does not pass. In order (the first that
fails names the verdict's reason; every number goes into the audit record):

    sanity       weights finite (checked on load), every loss finite
    improvement  fresh window: lower bound of 1 - candidate/serving loss >= min_improvement
    forgetting   old windows, overall and per domain: upper bound of candidate/serving - 1 <= max_forgetting
    anchor       the same against a fixed anchor version: <= anchor_max_forgetting, so tolerated
                 losses cannot compound promotion after promotion
    behaviour    mean per-token KL(serving || candidate) on the probes, less the candidate's gain
                 in loss on them, <= max_kl: drift the fixed probe text does not pay for
    generation   greedy generations from probe prompts are not degenerate (repeat ratio)

The behaviour gates credit what the candidate gained on the probes because a
young model changes everything as it learns: the demo model's first 50 steps
move its next-token distributions by 2.8 nats/token while its loss on the
probes falls by 2.5, and its greedy output starts to loop; a candidate trained
on random bytes moves them as far while its probe loss *rises* by 2-3 nats.

``deploy/evaluator.py`` measures, ``deploy/windows.py`` computes the loss
comparisons, ``deploy/verdict.py`` applies the gates in order and fills the
audit numbers, ``deploy/explain.py`` renders a verdict for people.
"""

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from everlearn.learners.config import CustomResources


class GateConfig(BaseModel):
    """When candidates are judged and what they must show to be promoted."""

    model_config = ConfigDict(extra="forbid")

    every_steps: int = Field(50, ge=1, description="Judge a candidate every this many optimizer steps (a checkpoint is written for it).")  # ~30 s of the demo model on 2 cores
    min_improvement: float = Field(0.01, ge=0, le=1, description="The lower confidence bound of the candidate's improvement on the fresh window, 1 - candidate loss / serving loss, must be at least this. 1 = can never pass.")  # 1 %: a real gain, not step-to-step noise
    max_forgetting: float = Field(0.02, ge=0, description="The upper confidence bound of candidate loss / serving loss - 1 on old held-out documents may be at most this, overall and in every domain with enough evidence.")  # 2 % per promotion; the anchor bounds what accumulates
    anchor_max_forgetting: float = Field(0.05, ge=0, description="The same bound against the anchor version (the first served, or the one gate.anchor_refresh_promotions refreshed to): what tolerated forgetting may add up to.")  # 2.5 promotions' worth of max_forgetting, then no more
    anchor_refresh_promotions: int = Field(0, ge=0, description="Make the newly served version the anchor after every this many promotions; 0 = never (the first served version stays the anchor).")  # 0: the anchor bound holds for the whole run; N lets losses grow by anchor_max_forgetting per N promotions
    min_fresh_documents: int = Field(4, ge=1, description="Do not judge until the fresh window holds at least this many held-out documents (its sequences are resampled by document). An old window (a domain) with fewer is not judged for forgetting.")  # below 4 a bootstrap bound is little more than the point estimate
    min_fresh_tokens: int = Field(1000, ge=1, description="Do not judge until the fresh window holds at least this many predicted tokens; an old window with fewer is not judged for forgetting.")  # ~4 sequences of 256 bytes
    min_fresh_sequences: int = Field(4, ge=1, description="Do not judge until the fresh window holds at least this many sequences (kept for older configs; min_fresh_documents says more).")
    max_eval_sequences: int = Field(64, ge=1, description="Sequences a judgement evaluates from each window: the fresh one, and each domain's old one (bounds its cost).")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap replicates behind each confidence bound.")  # the 5 % quantile of 1000 replicates moves by ~0.1 % of a loss between seeds: well below min_improvement; ~5 ms per bound
    confidence: float = Field(0.95, ge=0.5, lt=1, description="One-sided confidence of every bound (improvement's lower, forgetting's upper).")  # a candidate no better than serving passes the improvement gate at most 5 % of the time
    seed: int = Field(0, description="Seed of the bootstrap (with the candidate's step): a verdict can be recomputed from its audit record.")
    probe_sequences: int = Field(16, ge=1, description="Held-out sequences (the first of each of the first held-out documents, frozen for the run) on which behaviour drift and generations are checked.")  # ~4k tokens: a few % of a judgement's cost
    max_kl: float = Field(1.0, gt=0, description="Mean per-token KL(serving || candidate) of next-token distributions on the probe sequences, less what the candidate gained in loss on them, may be at most this (nats).")  # demo: good 50-step candidates 0.3-0.8 (a domain switch), random-bytes ones 2.3-3.0
    max_repeat_ratio: float = Field(0.9, ge=0, le=1, description="Greedy generations from probe prompts fail when their repeat ratio (1 - distinct / generated tokens, averaged) exceeds this AND serving's by more than gate.repeat_margin, unless the candidate gained gate.repeat_excused_gain on the probes.")  # > 0.9: 3 or fewer distinct tokens in 32, a collapse; the demo model's healthy loops reach 0.9
    repeat_margin: float = Field(0.1, ge=0, le=1, description="How much more repetitive than serving's a candidate's generations may be before the generation gate can fail.")  # a tiny model loops even when healthy: only a move towards collapse is a regression
    repeat_excused_gain: float = Field(0.5, ge=0, description="A candidate whose loss on the probes is this much lower than serving's (nats/token) passes the generation gate however repetitive: it is still learning the basics.")  # demo: the first 50 steps gain 2.5, later candidates < 0.6, poisoned ones lose 2-3
    evaluator_threads: int = Field(1, ge=1, description="Torch threads of the evaluator actor that judges candidates beside the learner.")  # leaves the learner its cores
    evaluator_num_cpus: float = Field(0.0, ge=0, description="CPUs the evaluator actor reserves in Ray.")  # 0: it shares the local cores, judging is brief
    evaluator_num_gpus: float = Field(0.0, ge=0, description="GPUs the evaluator actor reserves in Ray; > 0 scores the candidate, serving and anchor models on CUDA (a fraction shares a GPU).")
    evaluator_resources: CustomResources = Field(default_factory=dict, description="Custom Ray resources the evaluator actor reserves, e.g. {everlearn_cpu: 1} to keep it on the node group started with that resource.")
    idle_judge_s: float = Field(30.0, gt=0, description="When the stream goes quiet, judge the steps trained since the last judgement after this long (the last partial interval is not left unjudged).")  # a pause between uploads is shorter; a stream that stopped gets its last candidate judged within half a minute
    timeout_s: float = Field(600.0, gt=0, description="A judgement that takes longer fails (the evaluator is restarted); the next interval tries again.")
    candidate: Literal["trunk", "anneal_branch"] = Field("trunk", description="What a judgement judges. trunk: the run's checkpoint at that step. anneal_branch: a copy of it annealed for schedule.anneal_steps steps (phase 4 of the infinite schedule, constant_lr to min_lr) on the newest fresh windows and replay, in an actor of its own beside the trunk, which keeps training at the constant rate; the branches are kept under <checkpoint url>/branches. In warmup/cooldown the trunk is judged; a branch that fails or takes longer than gate.timeout_s is a failed verdict.")  # trunk: a branch costs a second learner's anneal_steps steps, CPU and memory per judgement; it buys ~2 % lower held-out loss than the trunk it came from (tiny model, tests/unit/test_branch.py): opt in where that pays


@dataclass(frozen=True)
class Evidence:
    """Held-out sequences (tokens padded to a common length, true lengths) for one judgement.

    ``*_documents`` give each sequence's document key (sequences of one document
    are resampled together); None: every sequence is a document of its own.
    ``old_domains`` names each old sequence's domain (None: one domain, "").
    ``probe_*`` is the fixed probe set (None or empty: the first fresh sequences stand in).
    """

    fresh_tokens: np.ndarray
    fresh_lengths: np.ndarray
    old_tokens: np.ndarray
    old_lengths: np.ndarray
    fresh_documents: np.ndarray | None = None
    old_documents: np.ndarray | None = None
    old_domains: tuple[str, ...] | None = None
    probe_tokens: np.ndarray | None = None
    probe_lengths: np.ndarray | None = None

    def documents(self, window: str) -> np.ndarray:
        docs = getattr(self, f"{window}_documents")
        n = len(getattr(self, f"{window}_lengths"))
        return np.arange(n, dtype=np.int64) if docs is None else np.asarray(docs, dtype=np.int64)

    def domains(self) -> tuple[str, ...]:
        return self.old_domains if self.old_domains is not None else ("",) * len(self.old_lengths)

    def probes(self) -> tuple[np.ndarray, np.ndarray]:
        if self.probe_tokens is not None and len(self.probe_tokens):
            return self.probe_tokens, np.asarray(self.probe_lengths)
        return self.fresh_tokens, self.fresh_lengths

    def counts(self, window: str) -> dict[str, int]:
        """Documents, sequences and predicted tokens (a sequence of n tokens predicts n - 1) of a window."""
        lengths = np.asarray(getattr(self, f"{window}_lengths"), dtype=np.int64)
        return {"documents": len(np.unique(self.documents(window))), "sequences": len(lengths),
                "tokens": int(np.maximum(lengths - 1, 0).sum())}


def too_little_evidence(cfg: GateConfig, counts: dict[str, int]) -> str | None:
    """Why the fresh window is not enough to judge on (every shortfall with its numbers), or None."""
    short = [f"{counts[k]} {k} < gate.min_fresh_{k}={getattr(cfg, f'min_fresh_{k}')}"
             for k in ("documents", "tokens", "sequences") if counts[k] < getattr(cfg, f"min_fresh_{k}")]
    if not short:
        return None
    return (f"skipped: the fresh window holds too little held-out evidence ({', '.join(short)}); "
            "judging waits for more held-out documents (raise holdout.fraction to get them sooner)")


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WindowScores:
    """The models' per-sequence loss sums on one window's sequences (the same sequences for every model)."""

    documents: np.ndarray  # document key per sequence
    domains: tuple[str, ...]  # domain per sequence
    tokens: np.ndarray  # predicted tokens per sequence
    losses: dict[str, np.ndarray]  # model role (candidate, serving, anchor) -> loss sum per sequence (nats)

    def mean(self, role: str, idx: np.ndarray | None = None) -> float:
        losses, tokens = (self.losses[role], self.tokens) if idx is None else (self.losses[role][idx], self.tokens[idx])
        return float(losses.sum() / max(int(tokens.sum()), 1))


@dataclass
class Measurements:
    """What the evaluator measured for one judgement; ``ConfidenceGate`` turns it into a verdict."""

    step: int  # the candidate's (seeds the bootstrap)
    fresh: WindowScores
    old: WindowScores
    anchor: dict[str, Any] = field(default_factory=dict)  # version, step, same_as_serving, unavailable (why)
    probes: WindowScores | None = None  # the frozen probe set, scored like a window: forgetting that drifting old windows cannot hide
    kl: float | None = None  # mean per-token KL(serving || candidate) on the probes; None: no probes
    kl_tokens: int = 0
    probe_sequences: int = 0
    probe_losses: dict[str, float] = field(default_factory=dict)  # model role -> mean loss on the probes (nats/token)
    repeat: dict[str, float] = field(default_factory=dict)  # model role -> mean repeat ratio of its generations
    samples: dict[str, str] = field(default_factory=dict)  # model role -> its first generation (text), for the audit


class Gate(Protocol):
    def evaluate(self, m: Measurements) -> GateResult: ...
