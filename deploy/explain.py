"""One audit record as text a person reads: the verdict, each gate with its numbers, the evidence behind them.

``everlearn gates explain`` prints it. Records of every kind render: a
judgement (promoted, rejected, skipped, failed), a revert, a rollback, a
manual promotion; fields a record lacks (older records, skipped ones) are left
out rather than guessed.
"""

from typing import Any

from everlearn.deploy.windows import OVERALL


def _pct(x: Any) -> str:
    return f"{x:+.2%}" if isinstance(x, int | float) else "-"


def _num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) else "-"


def explain(record: dict[str, Any]) -> str:
    """``record`` (one line of audit.jsonl) as readable text."""
    lines = [_headline(record)]
    if record.get("reason"):
        lines.append(f"  reason: {record['reason']}")
    m = record.get("metrics") or {}
    if not m:
        return "\n".join(lines)
    gates = m.get("gates") or []
    if gates:
        lines.append("  gates, in order:")
        lines += [f"    {'pass' if g['passed'] else 'FAIL'}  {g['reason']}" for g in gates]
    lines += _evidence(m)
    lines += _losses(m)
    imp = m.get("improvement")
    if imp:
        lines.append(f"  improvement on fresh: {_pct(imp['estimate'])} [{_pct(imp['lower'])}, {_pct(imp['upper'])}], "
                     f"needs lower bound >= {imp['threshold']:.2%}")
    for reference, table in (m.get("forgetting") or {}).items():
        lines += _forgetting(reference, table, m.get("anchor") or {})
    beh = m.get("behaviour")
    if beh and beh.get("kl") is not None:
        lines.append(f"  behaviour: KL(serving || candidate) {_num(beh['kl'])} nats/token on {beh.get('tokens', '-')} probe tokens, "
                     f"max {beh['threshold']}")
    gen = m.get("generation")
    if gen and gen.get("candidate") is not None:
        lines.append(f"  generation: repeat ratio candidate {_num(gen['candidate'], 3)}, serving {_num(gen['serving'], 3)} "
                     f"(fails above {gen['max_repeat_ratio']} and serving + {gen['repeat_margin']}); "
                     f"candidate wrote {gen.get('sample')!r}")
    b = m.get("bootstrap")
    if b:
        lines.append(f"  bootstrap: {b['samples']} replicates, {b['confidence']:.0%} one-sided, seed {b['seed']}, stream {b['stream']}; {b['method']}")
    if "sequences_scored" in m:
        lines.append(f"  cost: {m['sequences_scored']} sequences scored, {m.get('sequences_reused', 0)} reused; "
                     f"{record.get('judge_seconds', '-')} s")
    return "\n".join(lines)


def _headline(r: dict[str, Any]) -> str:
    verdict = r.get("verdict", "?")
    cand = r.get("candidate") or {}
    what = f"step {r.get('step')}" + (f" ({cand.get('name')})" if cand.get("name") else "")
    if verdict == "promoted":
        return f"{what}: PROMOTED to version {r.get('promoted_version')} (was version {r.get('serving_version')})" + \
            (" — manual" if r.get("manual") else "") + (" — then reverted" if r.get("reverted") else "")
    if verdict == "reverted":
        return f"version {r.get('reverted_version')}: REVERTED to version {r.get('serving_version')}"
    if verdict == "rolled_back":
        return f"version {r.get('rolled_back_from')}: ROLLED BACK to version {r.get('serving_version')} ({r.get('trigger', 'manual')})"
    return f"{what}: {verdict.upper()} against serving version {r.get('serving_version')}"


def _evidence(m: dict[str, Any]) -> list[str]:
    ev = m.get("evidence") or {}
    parts = [f"{w} {c['documents']} documents / {c['sequences']} sequences / {c['tokens']} tokens"
             for w, c in ev.items() if w in ("fresh", "old") and c]
    if ev.get("probes", {}).get("sequences"):
        parts.append(f"probes {ev['probes']['sequences']} sequences")
    return [f"  evidence: {'; '.join(parts)}"] if parts else []


def _losses(m: dict[str, Any]) -> list[str]:
    out = []
    for window, losses in (m.get("losses") or {}).items():
        out.append(f"  {window} loss (nats/token): " + ", ".join(f"{role} {_num(v)}" for role, v in losses.items()))
    return out


def _forgetting(reference: str, table: dict[str, Any], anchor: dict[str, Any]) -> list[str]:
    against = reference if reference == "serving" else f"anchor version {anchor.get('version')} (step {anchor.get('step')})"
    out = [f"  forgetting vs {against}: upper bounds must be <= {table['threshold']:.2%}"]
    for name, row in table["domains"].items():
        label = "all old windows" if name == OVERALL else f"domain {name}"
        size = f"{row['documents']} docs, {row['tokens']} tokens"
        if row.get("measured"):
            out.append(f"    {'ok  ' if row['passed'] else 'FAIL'}  {label}: {_pct(row['estimate'])} "
                       f"[{_pct(row['lower'])}, {_pct(row['upper'])}] ({size})")
        else:
            out.append(f"    --    {label}: not measured, too little evidence ({size})")
    return out
