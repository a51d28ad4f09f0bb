"""From a judgement's measurements to its verdict: the gates in order, each with all of its numbers.

``metrics`` of the result (what the audit log records):

    gates        [{name, passed, reason}] in evaluation order; the first failing one is the verdict's reason
    evidence     documents, sequences and predicted tokens of the fresh and old windows; probe sequences and tokens
    bootstrap    replicates, one-sided confidence, seed and stream (the candidate's step), method
    losses       token-weighted mean loss of each model on each window (nats per token)
    improvement  estimate, lower and upper bounds, threshold, passed, evidence
    forgetting   {serving, anchor}: threshold, passed, worst row, per-domain rows (overall under "(all)")
    anchor       the anchor version, and why it was not measured if it was not
    behaviour    KL estimate, threshold, passed, tokens
    generation   repeat ratio of candidate and serving, thresholds, passed, the candidate's first generation

plus ``candidate_fresh_loss``, ``serving_fresh_loss``, ``candidate_old_loss`` and
``serving_old_loss`` at the top level (the ``everlearn_gate_loss`` gauge reads them).
"""

import math
from typing import Any

import numpy as np

from everlearn.deploy.gates import GateConfig, GateResult, Measurements
from everlearn.deploy.windows import forgetting, forgetting_reason, improvement, with_probes

GATES = ("sanity", "improvement", "forgetting", "anchor", "behaviour", "generation")  # evaluation order; the failures metric's labels


def _r(x: Any) -> Any:
    """Numbers rounded for the audit (6 significant digits), recursively."""
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _r(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_r(v) for v in x]
    return x


class ConfidenceGate:
    """The gates of ``deploy/gates.py``, judged on one judgement's measurements."""

    def __init__(self, cfg: GateConfig):
        self.cfg = cfg

    def evaluate(self, m: Measurements) -> GateResult:
        cfg = self.cfg
        gates: list[dict[str, Any]] = []
        metrics: dict[str, Any] = {
            "gates": gates,
            "evidence": {"fresh": _counts(m.fresh), "old": _counts(m.old), "probes": {"sequences": m.probe_sequences, "tokens": m.kl_tokens}},
            "bootstrap": {"samples": cfg.bootstrap_samples, "confidence": cfg.confidence, "seed": cfg.seed, "stream": m.step,
                          "method": "percentile; documents resampled with replacement (within their domain for the old windows)"},
            "losses": {w: {role: s.mean(role) for role in s.losses} for w, s in (("fresh", m.fresh), ("old", m.old)) if len(s.tokens)},
            "anchor": m.anchor,
        }
        for window, scores in (("fresh", m.fresh), ("old", m.old)):
            for role in ("candidate", "serving"):
                if len(scores.tokens) and role in scores.losses:
                    metrics[f"{role}_{window}_loss"] = scores.mean(role)

        def gate(name: str, passed: bool, reason: str) -> bool:
            gates.append({"name": name, "passed": bool(passed), "reason": reason})
            return passed

        bad = [f"{role} on the {w} window" for w, s in (("fresh", m.fresh), ("old", m.old))
               for role, losses in s.losses.items() if not np.isfinite(losses).all()]
        if not gate("sanity", not bad, f"sanity: a loss is not finite ({', '.join(bad)})" if bad else "sanity: weights and losses finite"):
            return self._result(metrics)

        imp = metrics["improvement"] = improvement(cfg, m.step, m.fresh)
        gate("improvement", imp["passed"],
             f"improvement: fresh loss {'down' if imp['estimate'] >= 0 else 'up'} {abs(imp['estimate']):.2%}, lower bound {imp['lower']:+.2%} "
             f"{'>=' if imp['passed'] else '<'} gate.min_improvement {cfg.min_improvement:.2%} ({cfg.confidence:.0%} one-sided; "
             f"{imp['documents']} documents, {imp['tokens']} tokens)")

        metrics["forgetting"] = {}
        f = with_probes(cfg, m.step, forgetting(cfg, m.step, m.old, "serving", cfg.max_forgetting) if len(m.old.tokens) else None,
                        m.probes, cfg.max_forgetting)
        if f is not None:
            metrics["forgetting"]["serving"] = f
            gate("forgetting", f["passed"], forgetting_reason("forgetting", f, "max_forgetting", "serving"))
        else:
            gate("forgetting", True, "forgetting: not measured (no old held-out data yet)")

        against = f"anchor v{m.anchor.get('version')}"
        if m.anchor.get("unavailable"):
            gate("anchor", True, f"anchor: not measured ({m.anchor['unavailable']}); the judge makes the serving version the anchor")
        elif len(m.old.tokens) and "anchor" in m.old.losses:
            a = metrics["forgetting"]["anchor"] = forgetting(cfg, m.step, m.old, "anchor", cfg.anchor_max_forgetting)
            gate("anchor", a["passed"], forgetting_reason("anchor", a, "anchor_max_forgetting", against))
        else:
            gate("anchor", True, "anchor: not measured (no old held-out data yet)")

        self._behaviour(m, metrics, gate)
        self._generation(m, metrics, gate)
        return self._result(metrics)

    def _behaviour(self, m: Measurements, metrics: dict[str, Any], gate) -> None:
        cfg, gain = self.cfg, _probe_gain(m)
        if m.kl is None:
            metrics["behaviour"] = {"kl": None, "threshold": cfg.max_kl, "passed": True}
            gate("behaviour", True, "behaviour: not measured (no probe sequences yet)")
            return
        excess = m.kl - max(gain, 0.0)
        ok = math.isfinite(excess) and excess <= cfg.max_kl
        metrics["behaviour"] = {"kl": m.kl, "probe_gain": gain, "excess": excess, "threshold": cfg.max_kl, "passed": ok,
                                "tokens": m.kl_tokens, "probe_losses": m.probe_losses}
        gate("behaviour", ok, f"behaviour: KL(serving || candidate) {m.kl:.4f} nats/token less the probe gain {max(gain, 0.0):.4f} = "
                              f"{excess:.4f} {'<=' if ok else '>'} gate.max_kl {cfg.max_kl} ({m.probe_sequences} probe sequences, "
                              f"{m.kl_tokens} tokens)")

    def _generation(self, m: Measurements, metrics: dict[str, Any], gate) -> None:
        cfg = self.cfg
        cand, serv = m.repeat.get("candidate"), m.repeat.get("serving")
        g = metrics["generation"] = {"candidate": cand, "serving": serv, "max_repeat_ratio": cfg.max_repeat_ratio,
                                     "repeat_margin": cfg.repeat_margin, "sample": m.samples.get("candidate")}
        if cand is None or serv is None:
            g["passed"] = True
            gate("generation", True, "generation: not measured (no probe prompts yet)")
            return
        gain = g["probe_gain"] = _probe_gain(m)
        g["passed"] = not (cand > cfg.max_repeat_ratio and cand > serv + cfg.repeat_margin and gain < cfg.repeat_excused_gain)
        if not g["passed"]:
            gate("generation", False, f"generation: repeat ratio {cand:.3f} > gate.max_repeat_ratio {cfg.max_repeat_ratio} and > "
                                      f"serving's {serv:.3f} + gate.repeat_margin {cfg.repeat_margin}, with a probe gain of {gain:.3f} < "
                                      f"gate.repeat_excused_gain {cfg.repeat_excused_gain}: greedy output collapsed "
                                      f"(e.g. {(m.samples.get('candidate') or '')[:48]!r})")
        elif gain >= cfg.repeat_excused_gain and cand > cfg.max_repeat_ratio:
            gate("generation", True, f"generation: repeat ratio {cand:.3f} (serving {serv:.3f}), excused: the candidate gained "
                                     f"{gain:.3f} nats/token on the probes (still learning)")
        else:
            gate("generation", True, f"generation: repeat ratio {cand:.3f} (serving {serv:.3f}) not degenerate")

    def _result(self, metrics: dict[str, Any]) -> GateResult:
        gates = metrics["gates"]
        failed = next((g for g in gates if not g["passed"]), None)
        if failed is not None:
            return GateResult(False, failed["reason"], _r(metrics))
        imp = metrics["improvement"]
        unmeasured = [g["name"] for g in gates if "not measured" in g["reason"]]
        note = f"; not measured yet: {', '.join(unmeasured)}" if unmeasured else ""
        return GateResult(True, f"passed all {len(gates)} gates: fresh loss down {imp['estimate']:.2%} (lower bound "
                                f"{imp['lower']:+.2%} >= {self.cfg.min_improvement:.2%}){note}", _r(metrics))


def _probe_gain(m: Measurements) -> float:
    """How much lower the candidate's loss on the probes is than serving's (nats/token; 0 when not measured)."""
    return m.probe_losses["serving"] - m.probe_losses["candidate"] if m.probe_losses else 0.0


def _counts(scores) -> dict[str, int]:
    return {"documents": len(np.unique(scores.documents)), "sequences": len(scores.tokens), "tokens": int(np.asarray(scores.tokens).sum())}
