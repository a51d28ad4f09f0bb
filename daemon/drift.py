"""Drift: has the stream's content moved away from what serving learned, and is serving's loss rising?

Two detectors, one monitor (``DriftMonitor``):

* **data drift**: the byte (token) histogram of the newest ``window_tokens``
  tokens against a *reference* histogram, by PSI or Jensen-Shannon. The
  reference is the stream's first ``reference_tokens`` tokens and is taken again
  by ``refresh()`` (the daemon calls it after a promotion) from the newest
  ``reference_tokens`` tokens, so it follows what serving learned. One event per
  episode: it opens when the statistic exceeds its threshold and closes when the
  statistic falls below ``release_ratio`` x threshold, or on refresh.
* **loss drift**: Page-Hinkley (drift_stats.PageHinkley) on the serving model's
  per-document loss on fresh held-out documents; it starts over after firing and
  on refresh (a new serving model has a new loss level).

The token windows are drift_stats.TokenWindows: blocks of window_tokens / 16
tokens in a ring, so the window slides in O(vocab) per block and memory is
bounded; a token never counts in both the reference and the window compared
with it. One lock guards the state: the ingest thread observes tokens while the
supervisor checks, reads stats and checkpoints.
"""

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from everlearn.daemon.drift_stats import PageHinkley, TokenWindows, js_divergence, psi, top_changes

STATE_VERSION = 1
MAX_PENDING_EVENTS = 16  # loss events waiting for check(); one needs ph_min_samples losses, so this is rarely reached


class DriftResponseConfig(BaseModel):
    """What the daemon does on a drift event (data or loss); the monitor itself only reports."""

    model_config = ConfigDict(extra="forbid")

    judge_now: bool = Field(True, description="Judge a candidate at the next step instead of waiting for gate.every_steps.")  # the gates still decide; after a shift a candidate most likely differs from serving
    replay_boost: bool = Field(True, description="Restart the replay boost (buffer.replay_boost over buffer.boost_steps), as a shift of the domain mix does; nothing when buffer.replay_boost is null.")  # the same forgetting risk as a domain shift, caught when domain labels do not change
    lr_scale: float = Field(1.0, gt=0, le=10, description="Multiply the learning rate by this for buffer.boost_steps steps after a drift event (1.0: unchanged).")  # adapting faster also forgets faster: opt in


class DriftConfig(BaseModel):
    """Drift of the stream's byte distribution from a reference, and a rise in serving's held-out loss."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Watch the stream and the serving loss for drift (metrics, /status, events, the responses below).")  # one bincount per document: cheap enough to be on
    statistic: Literal["psi", "js"] = Field("psi", description="What decides data drift: psi (population stability index, nats) or js (Jensen-Shannon divergence, bits). Both are reported.")  # PSI has the established thresholds
    psi_threshold: float = Field(0.25, gt=0, description="PSI above this is data drift.")  # > 0.25 'significant shift' in scorecard monitoring (Siddiqi 2006; Yurdakul 2018)
    js_threshold: float = Field(0.05, gt=0, le=1, description="Jensen-Shannon divergence (bits, 0..1) above this is data drift.")  # JS ~ PSI / (8 ln 2) for small shifts, so PSI 0.25 ~ JS 0.045; measured: man pages vs Python 0.07-0.08, same-source windows' 95th percentile 0.043-0.046
    release_ratio: float = Field(0.4, gt=0, lt=1, description="A drift episode ends when the statistic falls below this x its threshold (or on refresh); only then can a new one be declared.")  # 0.1 / 0.25: PSI's 'no significant change' line over its 'significant' one
    reference_tokens: int = Field(262144, ge=16, description="Tokens in the reference histogram: the stream's first ones, then the newest ones at each refresh (after a promotion).")  # 256 KiB of text, ~128 demo documents: one man page or module cannot dominate; ring of 384 KiB
    window_tokens: int = Field(32768, ge=16, description="Newest tokens compared with the reference (a sliding window, moving by 1/16 of itself).")  # ~16 demo documents; 8 KiB windows of one source measured PSI > 0.25 in 15 % of windows (the bytes of 4 documents vary), 32 KiB against 256 KiB in 7-8 %
    min_tokens: int = Field(16384, ge=1, description="Compare only once both the window and the reference hold at least this many tokens.")  # half a window: sampling noise adds ~(used bytes - 1) / tokens ~ 0.006 to PSI
    ph_delta: float = Field(0.1, ge=0, description="Page-Hinkley: rise of the mean loss per document (nats/token) tolerated; smaller rises never fire.")  # below ~5 % of a byte model's 1.5-2 nats: the gates' business
    ph_lambda: float = Field(10.0, gt=0, description="Page-Hinkley threshold: cumulative excess loss (nats) that declares drift.")  # seeded simulation: 0 false alarms in 1e5 docs at noise sd 0.3 (2 at sd 0.5); a 0.5-nat rise found after ~26 docs
    ph_min_samples: int = Field(30, ge=1, description="Losses seen (since the last reset) before the loss detector may fire.")  # river's min_instances; the mean needs a few dozen samples to settle
    ph_two_sided: bool = Field(False, description="Also report a fall of the serving loss (the stream became easier or more familiar).")  # a fall is not a problem to respond to
    response: DriftResponseConfig = Field(default_factory=DriftResponseConfig, description=DriftResponseConfig.__doc__)

    @model_validator(mode="after")
    def _sizes(self) -> "DriftConfig":
        if self.window_tokens > self.reference_tokens:
            raise ValueError(f"drift.window_tokens={self.window_tokens} exceeds drift.reference_tokens={self.reference_tokens}: "
                             "the reference must be at least as large as the window; raise reference_tokens or lower window_tokens")
        if self.min_tokens > self.window_tokens:
            raise ValueError(f"drift.min_tokens={self.min_tokens} exceeds drift.window_tokens={self.window_tokens}: "
                             "the window would never hold enough to compare; lower min_tokens")
        return self


@dataclass(frozen=True)
class DriftEvent:
    """One detection. Data: sizes in tokens (reference, window); loss: samples since the test's last start."""

    kind: Literal["data", "loss"]
    statistic: str  # psi | js | page_hinkley_up | page_hinkley_down
    value: float
    threshold: float
    reference_size: int
    window_size: int
    message: str
    top_changes: list[tuple[int, float, float]] = field(default_factory=list)  # data: (token id, reference share, window share)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DriftMonitor:
    """Data and loss drift of one run (module docstring); thread-safe; ``state_dict`` goes into the run checkpoint."""

    def __init__(self, cfg: DriftConfig, vocab_size: int):
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size}: a token histogram needs at least 2 ids (pass tokenizer.vocab_size)")
        self.cfg, self.vocab = cfg, vocab_size
        self.tokens = TokenWindows(vocab_size, cfg.reference_tokens, cfg.window_tokens)
        self.ph = PageHinkley(cfg.ph_delta, cfg.ph_lambda, cfg.ph_min_samples, cfg.ph_two_sided)
        self.in_episode = False  # a data-drift event was declared and the statistic has not fallen back since
        self.counts = {"data_events": 0, "loss_events": 0, "refreshes": 0, "losses": 0, "losses_skipped": 0}
        self._events: list[DriftEvent] = []  # loss events waiting for check()
        self._lock = threading.Lock()

    # -- observing ----------------------------------------------------------
    def observe_tokens(self, tokens: np.ndarray) -> None:
        """Count one document's tokens (ingest thread); ids outside [0, vocab_size) raise ValueError."""
        tokens = np.asarray(tokens)
        if not self.cfg.enabled or tokens.size == 0:
            return
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens are {tokens.dtype}, not integer ids: pass what the tokenizer's encode() returned")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab:
            raise ValueError(f"token ids {lo}..{hi} fall outside the vocabulary of {self.vocab}: "
                             "build the DriftMonitor with the tokenizer's vocab_size")
        with self._lock:
            if self.tokens.add(tokens.ravel()):
                self.in_episode = False

    def observe_losses(self, losses: Sequence[float]) -> None:
        """Feed serving's per-document losses on fresh held-out documents; non-finite ones are skipped (counted)."""
        if not self.cfg.enabled:
            return
        with self._lock:
            for x in losses:
                if not math.isfinite(x):
                    self.counts["losses_skipped"] += 1
                    continue
                self.counts["losses"] += 1
                found = self.ph.update(float(x))
                if found and len(self._events) < MAX_PENDING_EVENTS:
                    self._events.append(self._loss_event(*found))

    def _loss_event(self, direction: str, value: float, n: int) -> DriftEvent:
        self.counts["loss_events"] += 1
        what = "rose" if direction == "up" else "fell"
        return DriftEvent("loss", f"page_hinkley_{direction}", round(value, 4), self.cfg.ph_lambda, 0, n,
                          f"serving's loss on fresh held-out documents {what}: Page-Hinkley {value:.2f} > "
                          f"drift.ph_lambda={self.cfg.ph_lambda} after {n} documents (tolerance drift.ph_delta="
                          f"{self.cfg.ph_delta}); the test starts over at the new level")

    # -- deciding -----------------------------------------------------------
    def _statistics(self) -> dict[str, float] | None:
        t = self.tokens
        if t.pending or min(int(t.reference.sum()), t.window_size) < self.cfg.min_tokens:
            return None
        current = t.current
        return {"psi": psi(t.reference, current), "js": js_divergence(t.reference, current)}

    def check(self) -> list[DriftEvent]:
        """Events since the last call: at most one data event per episode, and the loss detections."""
        if not self.cfg.enabled:
            return []
        with self._lock:
            events, self._events = self._events, []
            stats = self._statistics()
            if stats is None:
                return events
            name = self.cfg.statistic
            value, threshold = stats[name], getattr(self.cfg, f"{name}_threshold")
            if self.in_episode and value < self.cfg.release_ratio * threshold:
                self.in_episode = False
            elif not self.in_episode and value > threshold:
                self.in_episode = True
                self.counts["data_events"] += 1
                ref_n, win_n = int(self.tokens.reference.sum()), self.tokens.window_size
                events.insert(0, DriftEvent(
                    "data", name, round(value, 4), threshold, ref_n, win_n,
                    f"the byte distribution of the newest {win_n} tokens differs from the reference ({ref_n} tokens): "
                    f"{name} {value:.3f} > drift.{name}_threshold={threshold}; the stream's content changed. "
                    "drift.response decides what the daemon does; the reference follows at the next promotion",
                    top_changes(self.tokens.reference, self.tokens.current)))
            return events

    def refresh(self) -> None:
        """Serving changed (a promotion): the newest tokens become the reference, the episode ends, the loss test restarts."""
        with self._lock:
            self.tokens.take_reference()
            self.in_episode = False
            self.ph.reset()
            self.counts["refreshes"] += 1

    def stats(self) -> dict[str, Any]:
        """For /status and metrics: both statistics (None until comparable), the loss test, the episode, counters."""
        with self._lock:
            stats = self._statistics() or {}
            return {"enabled": self.cfg.enabled, "statistic": self.cfg.statistic, "psi": stats.get("psi"), "js": stats.get("js"),
                    "reference_tokens": int(self.tokens.reference.sum()), "window_tokens": self.tokens.window_size,
                    "collecting_reference": self.tokens.pending, "data_drift": self.in_episode,
                    "page_hinkley": self.ph.statistic_up,
                    "page_hinkley_down": self.ph.statistic_down if self.cfg.ph_two_sided else None,
                    "loss_samples": self.ph.n, **self.counts}

    # -- state --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Arrays (block ring, open block, reference) and JSON meta (positions, episode, loss test, counters).

        Events not yet taken by ``check()`` are not kept: the supervisor checks before it checkpoints.
        """
        with self._lock:
            arrays, meta = self.tokens.state()
            return {"arrays": arrays, "meta": {**meta, "version": STATE_VERSION, "vocab_size": self.vocab,
                                               "in_episode": self.in_episode, "counts": dict(self.counts),
                                               "page_hinkley": self.ph.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``. Other window sizes keep the reference and refill the window; another vocabulary or version raises."""
        try:
            arrays, meta = state["arrays"], state["meta"]
            version, vocab = meta.get("version"), meta["vocab_size"]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"drift state has no arrays/meta with version and vocab_size ({type(e).__name__}: {e}): "
                             "pass what DriftMonitor.state_dict() returned") from None
        if version != STATE_VERSION:
            raise ValueError(f"drift state version {version!r}, this build reads {STATE_VERSION}: "
                             "drop the drift state to start from a new reference")
        if vocab != self.vocab:
            raise ValueError(f"drift state counts {vocab} token ids, this run's tokenizer has {self.vocab}: histograms "
                             "of different vocabularies cannot be compared; drop the drift state to start from a new reference")
        ph = PageHinkley(self.cfg.ph_delta, self.cfg.ph_lambda, self.cfg.ph_min_samples, self.cfg.ph_two_sided)
        tokens = TokenWindows(self.vocab, self.cfg.reference_tokens, self.cfg.window_tokens)
        try:
            ph.load_state_dict(meta["page_hinkley"])
            tokens.load(arrays, meta)
            in_episode, counts = bool(meta["in_episode"]), {k: int(v) for k, v in meta.get("counts", {}).items()}
        except KeyError as e:
            raise ValueError(f"drift state lacks {e}: pass what DriftMonitor.state_dict() returned, or drop it") from None
        with self._lock:  # all checked first: a bad state leaves the monitor as it was
            self.tokens, self.ph, self.in_episode = tokens, ph, in_episode
            self.counts.update(counts)
