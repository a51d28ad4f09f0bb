"""The loss comparisons of a judgement: improvement on the fresh window, forgetting on the old ones.

Each comparison is a ratio of two models' token-weighted losses on the same
sequences, bounded by the document bootstrap (``deploy/bootstrap.py``). Every
comparison draws from a generator of its own, seeded by ``(gate.seed, the
candidate's step, a hash of the comparison's name)``: a bound does not change
when another domain appears, and any bound can be recomputed from the audit.

Forgetting is checked overall (documents resampled within their domain, as the
per-domain reservoirs sampled them) and in every domain with enough evidence
(``gate.min_fresh_documents`` documents and ``gate.min_fresh_tokens`` tokens):
a candidate that forgot one domain fails even when the others hide it in the
overall mean. A window with too little evidence is reported, not judged.
"""

import zlib
from typing import Any

import numpy as np

from everlearn.deploy.bootstrap import ratio_bounds
from everlearn.deploy.gates import GateConfig, WindowScores

PROBES = "(probes)"  # the frozen probe set's row in the forgetting table against serving
OVERALL = "(all)"  # the overall old window's name in the domain tables


def comparison_rng(cfg: GateConfig, step: int, name: str) -> np.random.Generator:
    """The generator of one comparison: ``(gate.seed, step, crc32(name))``."""
    return np.random.default_rng([cfg.seed, step, zlib.crc32(name.encode())])


def _evidence(scores: WindowScores, idx: np.ndarray) -> dict[str, int]:
    return {"documents": len(np.unique(scores.documents[idx])), "sequences": len(idx), "tokens": int(scores.tokens[idx].sum())}


def _enough(cfg: GateConfig, counts: dict[str, int]) -> bool:
    return counts["documents"] >= cfg.min_fresh_documents and counts["tokens"] >= cfg.min_fresh_tokens


def improvement(cfg: GateConfig, step: int, fresh: WindowScores) -> dict[str, Any]:
    """1 - candidate / serving loss on the fresh window, with its bounds; passes when the lower bound >= min_improvement."""
    b = ratio_bounds(fresh.losses["candidate"], fresh.losses["serving"], fresh.documents, samples=cfg.bootstrap_samples,
                     confidence=cfg.confidence, rng=comparison_rng(cfg, step, "improvement"))
    lower, estimate, upper = 1.0 - b.upper, 1.0 - b.estimate, 1.0 - b.lower
    return {"estimate": estimate, "lower": lower, "upper": upper, "threshold": cfg.min_improvement,
            "passed": bool(lower >= cfg.min_improvement), **_evidence(fresh, np.arange(len(fresh.documents)))}


def forgetting(cfg: GateConfig, step: int, old: WindowScores, reference: str, threshold: float) -> dict[str, Any]:
    """candidate / ``reference`` - 1 on the old windows, overall and per domain, each with its upper bound.

    Returns ``{"threshold", "passed", "worst", "domains": {name: row}}``: the overall row under
    ``OVERALL``; a row is ``measured`` when its window had enough evidence, and only measured
    rows can fail; ``worst`` names the measured row whose upper bound exceeds the threshold most.
    """
    domains = np.asarray(old.domains, dtype=object)
    windows = {OVERALL: np.arange(len(domains))} | {d: np.flatnonzero(domains == d) for d in sorted(set(old.domains))}
    rows: dict[str, dict[str, Any]] = {}
    for name, idx in windows.items():
        row: dict[str, Any] = _evidence(old, idx)
        if len(idx) and _enough(cfg, row):
            b = ratio_bounds(old.losses["candidate"][idx], old.losses[reference][idx], old.documents[idx],
                             samples=cfg.bootstrap_samples, confidence=cfg.confidence,
                             rng=comparison_rng(cfg, step, f"forgetting/{reference}/{name}"),
                             strata=domains[idx] if name == OVERALL else None)
            row.update(measured=True, estimate=b.estimate - 1.0, lower=b.lower - 1.0, upper=b.upper - 1.0,
                       passed=bool(b.upper - 1.0 <= threshold))
        else:
            row.update(measured=False, passed=True)
        rows[name] = row
    failing = [(r["upper"] - threshold, name) for name, r in rows.items() if r["measured"] and not r["passed"]]
    return {"threshold": threshold, "passed": not failing, "worst": max(failing)[1] if failing else None, "domains": rows}


def with_probes(cfg: GateConfig, step: int, table: dict[str, Any] | None, probes: WindowScores | None, threshold: float) -> dict[str, Any] | None:
    """``table`` (forgetting vs serving on the old windows) with a row for the frozen probe set.

    The old windows follow the stream: when the stream turns (a poisoned segment that even
    claims the old domain's name), its held-out documents age into them and the
    comparison drifts with it. The probes were frozen at the start of the run, so the
    candidate's loss on them against serving's shows forgetting the windows can hide.
    """
    if probes is None or not len(probes.tokens):
        return table
    row = forgetting(cfg, step, WindowScores(probes.documents, ("",) * len(probes.tokens), probes.tokens, probes.losses),
                     "serving", threshold)["domains"][OVERALL]
    table = table or {"threshold": threshold, "passed": True, "worst": None, "domains": {}}
    table["domains"][PROBES] = row
    failing = [(r["upper"] - threshold, name) for name, r in table["domains"].items() if r["measured"] and not r["passed"]]
    table.update(passed=not failing, worst=max(failing)[1] if failing else None)
    return table


def forgetting_reason(gate: str, table: dict[str, Any], setting: str, against: str) -> str:
    """The reason of a forgetting check (failed or passed), with the numbers of its worst or overall row."""
    rows, threshold = table["domains"], table["threshold"]
    if table["worst"] is not None:
        name = table["worst"]
        r = rows[name]
        where = "overall" if name == OVERALL else "on the frozen probe set" if name == PROBES else f"in domain {name!r}"
        return (f"{gate}: vs {against}, {where} the candidate's old loss is up {r['estimate']:+.2%} (upper bound "
                f"{r['upper']:+.2%} > gate.{setting} {threshold:.2%}; {r['documents']} documents, {r['tokens']} tokens)")
    measured = [n for n, r in rows.items() if r["measured"]]
    if not measured:
        return f"{gate}: vs {against}, not measured (no old window has enough held-out evidence yet)"
    top = max((rows[n]["upper"], n) for n in measured)
    return (f"{gate}: vs {against}, {len(measured)} old window(s) within gate.{setting} {threshold:.2%} "
            f"(highest upper bound {top[0]:+.2%}, {'overall' if top[1] == OVERALL else top[1]})")
