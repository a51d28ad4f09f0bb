"""The daemon throughput benchmark's variants, its summary of the runs, its tables and its plot."""

import statistics
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import NO_PLOT, pyplot

TARGET = 0.95  # daemon tokens/s over bare
BEFORE_RESTRUCTURE = 0.83
OFF = 10**9  # an interval never reached
BARE = ("bare", "bare_learner")
DAEMONS: dict[str, dict[str, int | None]] = {  # gate.every_steps, checkpoint.every_steps; None: the setup's
    "daemon": {"gate": None, "ckpt": None},
    "daemon_no_gates": {"gate": OFF, "ckpt": None},
    "daemon_no_gates_no_ckpt": {"gate": OFF, "ckpt": OFF},
}
VARIANTS = (*BARE, *DAEMONS)
DESCRIPTION = {
    "bare": "plain forward/backward/clip/AdamW loop (reference)",
    "bare_learner": "`Learner.train_step` in-process",
    "daemon": "Daemon, gates every {gate} + checkpoints every {ckpt} steps",
    "daemon_no_gates": "Daemon, no gates, checkpoints every {ckpt} steps",
    "daemon_no_gates_no_ckpt": "Daemon, no gates, no checkpoints",
}


def summarize(runs: dict[str, list[dict[str, Any]]], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bare = runs["bare"]
    for v, rs in runs.items():
        tps = [r["tokens_per_s"] for r in rs]
        ratios = [rs[i]["tokens_per_s"] / bare[i]["tokens_per_s"] for i in range(min(len(rs), len(bare)))]
        seconds = sum(r["seconds"] for r in rs)
        row = {
            "tokens_per_s_median": statistics.median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
            "ratio_to_bare": statistics.median(ratios) if ratios else None,
            "ratio_to_bare_min": min(ratios) if ratios else None, "ratio_to_bare_max": max(ratios) if ratios else None,
            "ratio_of_medians": statistics.median(tps) / statistics.median([r["tokens_per_s"] for r in bare]),
            "repeats": len(rs),
        }
        steps = sum(r["steps"] for r in rs)
        row["step_ms"] = 1e3 * seconds / steps
        # robust to bursts of other load (and blind to the periodic gates and checkpoints): the median step
        row["median_step_ms"] = 1e3 * statistics.median(x for r in rs for x in r["step_seconds"])
        if v == "bare":
            row.update(learner_share=1.0, wait_share=0.0, learner_step_ms=row["step_ms"])
        elif v == "bare_learner":
            learner = sum(r["learner_seconds"] for r in rs)
            row.update(learner_share=learner / seconds, wait_share=0.0, learner_step_ms=1e3 * learner / steps)
        else:
            learner = sum(r["learner_seconds"] for r in rs)
            wait = sum(r["registry"]["train_wait_seconds"] for r in rs)
            ckpt = sum(r["registry"]["checkpoint_write_seconds_sum"] for r in rs)
            row.update(learner_share=learner / seconds, wait_share=wait / seconds, checkpoint_share=ckpt / seconds,
                       other_share=max(0.0, 1 - (learner + wait + ckpt) / seconds),
                       learner_step_ms=1e3 * learner / steps, wait_ms=1e3 * wait / steps, checkpoint_ms=1e3 * ckpt / steps,
                       other_ms=1e3 * (seconds - learner - wait - ckpt) / steps,
                       checkpoints_per_window=statistics.median(r["registry"]["checkpoints"] for r in rs),
                       judgements_per_window=statistics.median(r["registry"]["judge_seconds_count"] for r in rs),
                       startup_s_median=statistics.median(r["startup_seconds"] for r in rs))
        cpu: dict[str, float] = {}
        for r in rs:
            for k, val in r["cpu_seconds"].items():
                cpu[k] = cpu.get(k, 0.0) + val
        row["cpu_ms_per_step"] = {k: 1e3 * val / steps for k, val in cpu.items()}
        row["outside_cores"] = [round(r.get("outside_cores", 0.0), 3) for r in rs]
        row["cpu_cores_busy"] = {k: val / seconds for k, val in cpu.items()}
        out[v] = row
    out["_rounds"] = rounds
    return out


def fmt_range(s: dict[str, Any]) -> str:
    return f"{s['tokens_per_s_median']:,.0f} [{s['tokens_per_s_min']:,.0f} – {s['tokens_per_s_max']:,.0f}]"


def describe(v: str, res: dict[str, Any]) -> str:
    return DESCRIPTION[v].format(gate=res["setup"]["gate_every"], ckpt=res["setup"]["ckpt_every"])


def render(res: dict[str, Any]) -> str:
    s, setup = res["summary"], res["setup"]
    variants = [v for v in VARIANTS if v in s]
    reps = s["bare"]["repeats"]
    out = [f"Model {res['model_desc']}; batch {setup['batch_size']} x seq_len {setup['seq_len']}, "
           f"torch threads {setup['torch_threads']}; daemon window: steps {setup['warmup'] + 1}–{setup['warmup'] + setup['measure']} "
           f"(after W = {setup['warmup']} steps), bare: {setup['bare_steps']} steps after {setup['bare_warmup']}; "
           f"{reps} interleaved round{'s' if reps > 1 else ''}; target: daemon >= {TARGET:g} x bare "
           f"(before the restructure: {BEFORE_RESTRUCTURE:g}).",
           "",
           "| variant | what | tokens/s median [min – max] | ratio to bare [min – max] | learner compute share | wait share | target |",
           "|:---|:---|---:|---:|---:|---:|:---|"]
    for v in variants:
        r = s[v]
        ratio = "1 (reference)" if v == "bare" else f"{r['ratio_to_bare']:.3f} [{r['ratio_to_bare_min']:.3f} – {r['ratio_to_bare_max']:.3f}]"
        tgt = "met" if r["ratio_to_bare"] >= TARGET else "MISSED"
        tgt = tgt if v.startswith("daemon") else ""
        wait = "-" if v in BARE else f"{100 * r['wait_share']:.1f} %"
        out.append(f"| `{v}` | {describe(v, res)} | {fmt_range(r)} | {ratio} | {100 * r['learner_share']:.1f} % | {wait} | {tgt} |")
    q = setup.get("quiet_below", 0)
    if q:
        disturbed = [f"`{v}` round {r['round'] + 1}" for v in variants for r in res["runs"][v] if r.get("disturbed")]
        out += ["",
                f"Other users share this machine: before each run the benchmark waited until other processes used "
                f"< {q:g} cores (3 s samples); a run during which they used > {setup['max_outside']:g} cores on average "
                f"was measured again (at most {setup['retries']} times). Runs measured again: {len(res['discarded'])}"
                + (f"; still disturbed after the retries, kept: {', '.join(disturbed)}" if disturbed else "")
                + ". Cores used by other processes during each kept run: "
                + "; ".join(f"`{v}` " + "/".join(f"{x:.2f}" for x in s[v]["outside_cores"]) for v in variants) + "."]
    dv = [v for v in variants if v not in BARE]
    if dv:
        bare_ms = s["bare"]["step_ms"]
        out += ["",
                "Where a step's time goes (ms per step, summed over the rounds' windows; "
                "learner = `everlearn_train_step_seconds`, the learner's own `train_step`; "
                "wait = `everlearn_train_wait_seconds_total`; checkpoint = `everlearn_checkpoint_write_seconds`; "
                "other = the rest: the driver's work, the `ray.get` round trip, waiting for a judgement in flight):",
                "",
                "| variant | step (mean) | median step | learner | (learner - bare step) | wait on ingest | checkpoint writes | other | checkpoints / judgements in window |",
                "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        out.append(f"| `bare` | {bare_ms:.1f} | {s['bare']['median_step_ms']:.1f} | {bare_ms:.1f} | 0 | - | - | - | - |")
        if "bare_learner" in s:
            r = s["bare_learner"]
            out.append(f"| `bare_learner` | {r['step_ms']:.1f} | {r['median_step_ms']:.1f} | {r['learner_step_ms']:.1f} | {r['learner_step_ms'] - bare_ms:+.1f} | - | - | "
                       f"{r['step_ms'] - r['learner_step_ms']:.1f} | - |")
        for v in dv:
            r = s[v]
            out.append(f"| `{v}` | {r['step_ms']:.1f} | {r['median_step_ms']:.1f} | {r['learner_step_ms']:.1f} | {r['learner_step_ms'] - bare_ms:+.1f} | "
                       f"{r['wait_ms']:.2f} | {r['checkpoint_ms']:.1f} | {r['other_ms']:.1f} | "
                       f"{r['checkpoints_per_window']:g} / {r['judgements_per_window']:g} |")
        roles = sorted({k for v in variants for k in s[v]["cpu_ms_per_step"]} - {"machine (all processes)"},
                       key=lambda k: (k == "outside this benchmark", k))
        out += ["",
                "CPU time in the window, ms per step, by process (/proc; 2 cores = 2 x the step time available). "
                "`outside this benchmark`: the machine's busy time minus this benchmark's processes (other users).",
                "",
                "| process | " + " | ".join(f"`{v}`" for v in variants) + " |",
                "|:---|" + "---:|" * len(variants)]
        for k in roles:
            out.append(f"| {k} | " + " | ".join(f"{s[v]['cpu_ms_per_step'].get(k, 0.0):.1f}" for v in variants) + " |")
        out.append("| **step wall time x 2 cores** | " + " | ".join(f"{2 * s[v]['step_ms']:.1f}" for v in variants) + " |")
        out += ["",
                "Start-up excluded from the window (run() until the first step's end: Ray, the learner actor, "
                "the step-0 checkpoint), median: " + ", ".join(f"`{v}` {s[v]['startup_s_median']:.1f} s" for v in dv) + "."]
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    s = res["summary"]
    variants = [v for v in VARIANTS if v in s]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    med = [s[v]["tokens_per_s_median"] for v in variants]
    err = [[m - s[v]["tokens_per_s_min"] for v, m in zip(variants, med, strict=True)],
           [s[v]["tokens_per_s_max"] - m for v, m in zip(variants, med, strict=True)]]
    colors = ["#555555", "#888888"] + ["C0", "C1", "C2"][: len(variants) - 2]
    ax1.bar(range(len(variants)), med, yerr=err, capsize=4, color=colors[: len(variants)])
    bare = s["bare"]["tokens_per_s_median"]
    ax1.axhline(TARGET * bare, color="red", linestyle="--", label=f"target: {TARGET:g} x bare")
    for i, v in enumerate(variants):  # the table's ratio: median over rounds of variant / bare of the same round
        ratio = s[v]["ratio_to_bare"] if v != "bare" else 1.0
        ax1.text(i, s[v]["tokens_per_s_max"] * 1.01, f"{ratio:.3f}x", ha="center", va="bottom", fontsize=9)
    ax1.set_xticks(range(len(variants)), [v.replace("daemon_", "daemon\n").replace("bare_", "bare\n") for v in variants], fontsize=8)
    ax1.set_ylabel("training tokens/s (median, min–max); label: ratio to bare")
    ax1.set_title(f"Throughput, {res['model_desc_short']}")
    ax1.legend(loc="lower right")
    ax1.set_ylim(0, max(s[v]["tokens_per_s_max"] for v in variants) * 1.15)
    w0 = res["setup"]["warmup"]
    for v, color in zip([v for v in variants if v not in BARE], ["C0", "C1", "C2"], strict=False):
        run = res["runs"][v][0]
        steps = np.arange(w0 + 1, w0 + 1 + len(run["step_seconds"]))
        tok = run["tokens"] / max(run["steps"], 1)
        ax2.plot(steps, tok / np.asarray(run["step_seconds"]), lw=0.9, color=color, label=v)
    bare_steps = np.asarray(res["runs"]["bare"][0]["step_seconds"])
    ax2.axhline(res["runs"]["bare"][0]["tokens"] / len(bare_steps) / np.median(bare_steps), color="#555555", lw=1,
                label="bare (median step)")
    ax2.set_xlabel("optimizer step (the window, round 1)")
    ax2.set_ylabel("tokens/s of each step")
    ax2.set_title("Per step: gates and checkpoints show as dips")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8, loc="lower left")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"
