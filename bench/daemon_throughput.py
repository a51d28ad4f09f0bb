"""Benchmark of the daemon's training throughput against a bare PyTorch loop on the same model.

It measures and reports; it never asserts a timing (the target is shown next
to the numbers, marked met or missed).

DESIGN target: daemon training tokens/s >= 0.95 x a bare PyTorch loop on the
same model, batch and threads (measured before the stages restructure: 0.83),
for full fine-tuning and for LoRA (the ``*_lora`` variants, against a bare
LoRA loop).

What is measured
----------------
Every variant trains the same model (``build_model(cfg.model, build_tokenizer(cfg.model))``:
the embedded default, examples/local.yaml, a 4 x 256 Llama, 5.3M parameters),
the same batch (``train.batch_size`` x ``train.seq_len`` = 8 x 256) with AdamW
of the same hyper-parameters, ``torch.set_num_threads(train.torch_threads)``
(2). Tokens are counted as ``StepStats.tokens`` counts them: tokens that carry
a loss, ``batch x (seq_len - 1)`` for full windows.

``bare``
    A plain loop in this process, without the ``Learner`` class: random token
    batches (byte ids, full windows: every window the daemon trains is full),
    the learner's mask (``positions < lengths``) and loss as
    ``Learner._loss_sum`` computes it: ``model(input_ids, attention_mask).logits``,
    the logits but the last as float32, targets = ids shifted by one, -100 where
    masked, ``cross_entropy(reduction="sum")`` divided by the predicted tokens
    (not ``labels=``: the learner sums the loss itself so that micro-batches and
    data-parallel workers divide by the whole step's tokens); ``backward``,
    ``clip_grad_norm_(train.grad_clip)``, ``step``, ``zero_grad(set_to_none=True)``,
    the learning rate set from the infinite schedule each step. This is the
    reference of the ratio.
``bare_learner``
    ``Learner.train_step`` called in this process on the same batches: the
    ``Learner`` class's own overhead (finite checks, schedule, stats) over ``bare``.
``bare_lora``, ``bare_learner_lora``, ``daemon_lora``, ``daemon_no_gates_lora``, ``daemon_no_gates_no_ckpt_lora``
    The same five with LoRA (``--lora-r``, 8; ``model.lora.alpha`` 16, dropout 0,
    ``--lora-targets``: peft's default for Llama, q_proj and v_proj). ``bare_lora``
    is ``bare`` on ``peft.get_peft_model(model, LoraConfig(r, alpha, dropout,
    target_modules))`` with AdamW over the trainable (adapter) parameters only,
    the same loss; the learner and the daemon run with ``model.lora.r`` set. A
    LoRA variant's ratio is to ``bare_lora`` of the same round.
``daemon``, ``daemon_no_gates``, ``daemon_no_gates_no_ckpt``
    The real ``everlearn.daemon.service.Daemon`` in this process (``Daemon(cfg,
    out=StringIO)``, ``run(max_steps=W + M)`` on the main thread; the signal
    handlers it installs are restored afterwards), on a local directory stream
    seeded before the start with ``everlearn.daemon.demo`` text (man pages,
    then Python sources, as .jsonl). ``serve.enabled: false``: serving is not
    on the training path (a promotion is a file write and a swap in the
    replicas' own processes; with serving on, its replica would also compete
    for the two cores). ``daemon``: ``gate.every_steps`` 50 and
    ``checkpoint.every_steps`` 100 as in the default config (a gate writes the
    candidate's checkpoint, so that is a checkpoint every 50 steps and a
    judgement in the evaluator actor every 50 steps). ``daemon_no_gates``:
    gates at 10**9, checkpoints every 100 steps. ``daemon_no_gates_no_ckpt``:
    both at 10**9 (the step-0 and the final checkpoint are outside the window).
    Everything else is the default config: replay 2 of 8 rows from the uniform
    reservoir, lineage on, ingest thread with a queue of 64 windows, local Ray
    with ``ray.num_cpus = 2`` started by the daemon itself (``--shared-ray``:
    one Ray for all runs, the default of ``--quick``).

Steady state: each optimizer step's end is timed inside the daemon's loop (a
subclass whose ``_observe`` appends ``(perf_counter, step, tokens, learner
seconds)`` after the original's work; nothing else is changed). The rate is
the tokens of steps W+1 .. W+M over the time from the end of step W to the end
of step W+M, so Ray's start, the actors' start, the step-0 checkpoint, the
first steps and the evaluator actor's start (it loads torch while the
first steps run) are excluded. W = 75 and M = 100: the window holds one full period of gates (100,
150) and checkpoints (100, 150). At steps W and W+M the benchmark reads the
run's Prometheus registry (``everlearn_train_wait_seconds_total``: time the
loop waited on ingest; ``everlearn_train_step_seconds_sum``: the learner's own
time inside ``train_step``; ``everlearn_checkpoint_write_seconds_sum``) and
the CPU time of every process it started (``/proc``: the driver's threads,
the learner and evaluator actors, Ray's own processes, the reaper) and of the
whole machine, so the breakdown is visible: learner compute, waiting on
ingest, checkpoint writes, the rest (driver and Ray round trips, gates
waiting), and what else used the two cores meanwhile.

``bare`` (and ``bare_lora``) runs ``--bare-warmup`` steps untimed, then ``--bare-steps`` timed.
Each measurement is repeated ``--repeats`` times, interleaved (one round runs
every variant, the order rotated by one each round) so that the variants
share the machine's noise; reported: median [min - max]; ratio = median over
rounds of (variant / bare of the same round).

Command (from the repository root)::

    .venv/bin/python bench/daemon_throughput.py --out docs/bench

writes docs/bench/daemon_throughput.md (tables, the command, the machine),
docs/bench/daemon_throughput.json (every raw number, the per-step times) and,
when matplotlib is importable, docs/bench/daemon_throughput.png (``--name``:
another name). ``--variants`` runs a subset (the reference of each family
chosen, ``bare`` or ``bare_lora``, always runs). ``--threads`` sets
``train.torch_threads`` of every variant (on a machine others load, 1 thread
avoids the stalls of a 2-thread step whose second thread lost its core);
``--equal-niceness`` starts Ray's workers at this process's niceness (Ray's
default is 15: on a machine others load, the learner actor then loses its core
to them while the bare loops, at niceness 0, do not).
``--quick``
is a smoke run of a tiny model (hidden 64, 2 layers, seq_len 64, batch 8,
1 thread, 20 % held out, gates every 10 and checkpoints every 20 steps, W = 25, M = 20, one
round, one shared Ray); its numbers are not the reference ones.
"""

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import NO_PLOT, command_line, machine_info, pyplot, report, save_figure  # noqa: E402  (bench/ is not a package)
from procstat import cpu_delta, cpu_snapshot, wait_quiet  # noqa: E402
from throughput_report import (  # noqa: E402
    BARE,
    BEFORE_RESTRUCTURE,
    DAEMONS,
    TARGET,
    VARIANTS,
    describe,
    fmt_range,
    summarize,
)
from throughput_report import plot as plot_full  # noqa: E402
from throughput_report import render as render_full  # noqa: E402

LORA = "_lora"  # a LoRA variant is its full fine-tuning twin's name + this
LORA_VARIANTS = tuple(v + LORA for v in VARIANTS)
ALL_VARIANTS = (*VARIANTS, *LORA_VARIANTS)
NICENESS_ENV = "RAY_worker_niceness"  # Ray starts its workers at this niceness (default 15)


def twin(variant: str) -> str:
    """The full fine-tuning variant a (LoRA) variant mirrors: ``daemon_lora`` -> ``daemon``."""
    return variant.removesuffix(LORA)


def is_lora(variant: str) -> bool:
    return variant.endswith(LORA)


@dataclass
class Setup:
    overrides: list[str]  # --set style, on top of the embedded default
    gate_every: int
    ckpt_every: int
    warmup: int  # daemon steps before the window (W)
    measure: int  # daemon steps in the window (M)
    bare_warmup: int
    bare_steps: int
    shared_ray: bool
    quiet_below: float = 0.0  # wait before each run until other processes use fewer cores than this (0: do not wait)
    max_outside: float = float("inf")  # a run during which other processes used more cores on average is redone
    retries: int = 0  # redos per measurement (then the last one is kept, marked)
    lora_r: int = 8  # rank of the LoRA variants
    lora_targets: str | None = None  # model.lora.target_modules of the LoRA variants (None: peft's default)
    extra: dict[str, Any] = field(default_factory=dict)


FULL = Setup([], 50, 100, 75, 100, 5, 60, False, quiet_below=0.15, max_outside=0.25, retries=2)
QUICK = Setup(["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128",
               "model.max_position_embeddings=128", "train.seq_len=64", "train.batch_size=8", "train.torch_threads=1",
               "source.poll_interval_s=0.2", "holdout.fraction=0.2"], 10, 20, 25, 20, 3, 30, True)  # gates with evidence early


# -- config ------------------------------------------------------------------
def lora_overrides(setup: Setup) -> list[str]:
    targets = setup.lora_targets
    if targets and targets != "all-linear":
        targets = "[" + targets + "]"  # a YAML list: q_proj,v_proj -> [q_proj,v_proj]
    return [f"model.lora.r={setup.lora_r}"] + ([f"model.lora.target_modules={targets}"] if targets else [])


def make_config(setup: Setup, root: Path, stream: Path, gate: int, ckpt: int, lora: bool = False):
    from everlearn.daemon.config import load_config

    return load_config(None, env={}, overrides=[
        f"run_dir={root}", f"source.url={stream}", "serve.enabled=false", "metrics.port=0",
        "demo.seed_if_empty=false", f"gate.every_steps={gate}", f"checkpoint.every_steps={ckpt}", *setup.overrides,
        *(lora_overrides(setup) if lora else []),
    ])


def seed_stream(cfg, setup: Setup, stream: Path) -> dict[str, Any]:
    """Demo text (man pages, then Python sources) as .jsonl, enough for every step of a run."""
    from everlearn.daemon.demo import seed_demo_stream

    steps = setup.warmup + setup.measure + 10
    needed = steps * cfg.train.batch_size * cfg.train.seq_len / (1 - cfg.holdout.fraction)
    per_domain = max(10_000, int(needed * 0.6))  # the first domain covers 60 % of the run, both 120 %
    files = seed_demo_stream(stream, per_domain)
    return {"files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files), "bytes_per_domain": per_domain}


# -- bare --------------------------------------------------------------------
def random_batches(cfg, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 259, size=(cfg.train.batch_size, cfg.train.seq_len), dtype=np.int32) for _ in range(n)]


def bare_lora_model(model, lora_cfg):
    """``model`` with LoRA adapters by peft directly (not the learner's helper): r, alpha, dropout, target modules."""
    import warnings

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(model, PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                                    target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM"))


def run_bare(cfg, setup: Setup, seed: int) -> dict[str, Any]:
    """The plain loop: forward with the learner's mask, the summed cross-entropy over the predicted tokens, backward,
    clip, AdamW step. With ``model.lora.r`` set (``bare_lora``): LoRA by peft, AdamW over the adapters only."""
    import torch
    import torch.nn.functional as F

    from everlearn.learners import InfiniteSchedule, build_model, build_tokenizer

    tc = cfg.train
    torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model, build_tokenizer(cfg.model))
    if cfg.model.lora.r:
        model = bare_lora_model(model, cfg.model.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = InfiniteSchedule(cfg.schedule)
    opt = torch.optim.AdamW(params, lr=schedule(0), betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    batches = random_batches(cfg, 8, seed)
    lengths = torch.full((tc.batch_size,), tc.seq_len, dtype=torch.int64)

    def step(i: int) -> int:
        for group in opt.param_groups:
            group["lr"] = schedule(i)
        ids = torch.from_numpy(batches[i % len(batches)].astype(np.int64))
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
        n = int(mask[:, 1:].sum())
        (loss_sum / n).backward()
        float(loss_sum.detach())
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return n

    return _time_steps(step, setup)


def run_bare_learner(cfg, setup: Setup, seed: int, tmp: Path) -> dict[str, Any]:
    """``Learner.train_step`` in this process, on the same batches."""
    from everlearn.learners import Learner

    learner = Learner(cfg.model, cfg.train, cfg.schedule, str(tmp / "learner-store"))
    batches = random_batches(cfg, 8, seed)
    lengths = np.full(cfg.train.batch_size, cfg.train.seq_len, dtype=np.int32)
    inner: list[float] = []

    def step(i: int) -> int:
        stats = learner.train_step(batches[i % len(batches)], lengths)
        if stats.skipped:
            raise RuntimeError(f"bare_learner: step skipped: {stats.skipped}")
        inner.append(stats.seconds)
        return stats.tokens

    res = _time_steps(step, setup)
    res["learner_seconds"] = float(sum(inner[setup.bare_warmup :]))
    return res


def _time_steps(step: Callable[[int], int], setup: Setup) -> dict[str, Any]:
    for i in range(setup.bare_warmup):
        step(i)
    cpu0, t_prev = cpu_snapshot(), time.perf_counter()
    t0, tokens, times = t_prev, 0, []
    for i in range(setup.bare_warmup, setup.bare_warmup + setup.bare_steps):
        tokens += step(i)
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
    seconds = t_prev - t0
    cpu = cpu_delta(cpu0, cpu_snapshot())
    return {"steps": setup.bare_steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "step_seconds": [round(t, 6) for t in times], "cpu_seconds": cpu}


# -- daemon ------------------------------------------------------------------
def _probed_daemon_class():
    from everlearn.daemon.service import Daemon

    class ProbedDaemon(Daemon):
        """The real daemon; ``_observe`` (called once per taken step, in the loop) also records the step's end."""

        def __init__(self, cfg, out, window: tuple[int, int]):
            super().__init__(cfg, out=out)
            self.window = window
            self.trace: list[tuple[float, int, int, float]] = []
            self.marks: dict[int, dict[str, Any]] = {}

        def _observe(self, stats) -> None:
            super()._observe(stats)
            self.trace.append((time.perf_counter(), stats.step, stats.tokens, stats.seconds))
            if stats.step in self.window:
                self.marks[stats.step] = {"t": self.trace[-1][0], "registry": registry_values(self.metrics.registry),
                                          "cpu": cpu_snapshot()}

    return ProbedDaemon


REGISTRY_KEYS = {
    "tokens_trained": "everlearn_tokens_trained_total",
    "train_wait_seconds": "everlearn_train_wait_seconds_total",
    "train_step_seconds_sum": "everlearn_train_step_seconds_sum",
    "train_step_seconds_count": "everlearn_train_step_seconds_count",
    "checkpoint_write_seconds_sum": "everlearn_checkpoint_write_seconds_sum",
    "checkpoints": "everlearn_checkpoints_total",
    "judge_seconds_sum": "everlearn_judge_seconds_sum",
    "judge_seconds_count": "everlearn_judge_seconds_count",
}


def registry_values(registry) -> dict[str, float]:
    return {k: float(registry.get_sample_value(name) or 0.0) for k, name in REGISTRY_KEYS.items()}


def run_daemon(variant: str, setup: Setup, tmp: Path, stream: Path, run_no: int) -> dict[str, Any]:
    gate = DAEMONS[twin(variant)]["gate"] or setup.gate_every
    ckpt = DAEMONS[twin(variant)]["ckpt"] or setup.ckpt_every
    root = tmp / f"run-{run_no:02d}-{variant}"
    cfg = make_config(setup, root, stream, gate, ckpt, lora=is_lora(variant))
    w0, w1 = setup.warmup, setup.warmup + setup.measure
    out = io.StringIO()
    daemon = _probed_daemon_class()(cfg, out, (w0, w1))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    t_start = time.perf_counter()
    try:
        daemon.run(max_steps=w1)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    t_end = time.perf_counter()
    if daemon.stop_event.is_set():
        raise KeyboardInterrupt(f"{variant}: the daemon was asked to stop")
    if w0 not in daemon.marks or w1 not in daemon.marks:
        raise RuntimeError(f"{variant}: the run ended at step {daemon.step} before the window ({w0}, {w1}]:\n{out.getvalue()[-3000:]}")
    a, b = daemon.marks[w0], daemon.marks[w1]
    seconds = b["t"] - a["t"]
    reg = {k: b["registry"][k] - a["registry"][k] for k in REGISTRY_KEYS}
    steps = [s for s in daemon.trace if w0 < s[1] <= w1]
    tokens = sum(s[2] for s in steps)
    learner = sum(s[3] for s in steps)
    t_first = daemon.trace[0][0] - t_start if daemon.trace else None
    events = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    gates = [{"step": e["step"], "verdict": e["verdict"]} for e in events if e.get("event") == "gate"]
    intervals = np.diff([a["t"]] + [s[0] for s in steps])
    return {
        "gate_every": gate, "ckpt_every": ckpt, "window": [w0, w1], "steps": len(steps), "tokens": tokens,
        "seconds": seconds, "tokens_per_s": tokens / seconds,
        "learner_seconds": learner,  # sum of StepStats.seconds: the learner's own train_step time
        "registry": reg,
        "tokens_registry_check": reg["tokens_trained"] == tokens,
        "cpu_seconds": cpu_delta(a["cpu"], b["cpu"]),
        "step_seconds": [round(float(x), 6) for x in intervals],
        "learner_step_seconds": [round(s[3], 6) for s in steps],
        "startup_seconds": t_first,  # run() until the first step's end: Ray, actors, step-0 checkpoint
        "total_seconds": t_end - t_start,
        "gates": gates,
        "final_step": daemon.step,
        "loadavg_at_start": os.getloadavg(),
    }


# -- summary, tables, plot ----------------------------------------------------
def summarize_families(runs: dict[str, list[dict[str, Any]]], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """``throughput_report.summarize`` per family: full fine-tuning against ``bare``, LoRA against ``bare_lora``
    (a LoRA row's ``ratio_to_bare`` is to ``bare_lora`` of the same round; ``reference`` names it)."""
    out: dict[str, Any] = {"_rounds": rounds}
    full = {v: rs for v, rs in runs.items() if not is_lora(v)}
    if full:
        out.update(summarize(full, rounds))
    lora = {twin(v): rs for v, rs in runs.items() if is_lora(v)}
    if lora:
        for v, row in summarize(lora, rounds).items():
            if v != "_rounds":
                out[v + LORA] = {**row, "reference": "bare" + LORA}
        if "bare" in runs:  # what LoRA buys: its bare loop against full fine-tuning's, round by round
            pairs = list(zip(runs["bare" + LORA], runs["bare"], strict=False))
            out["lora_over_full_bare"] = statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)
    return out


def render(res: dict[str, Any]) -> str:
    """Full fine-tuning's tables (throughput_report), then LoRA's, then CPU time per step of both."""
    s = res["summary"]
    parts = [render_full(res)] if "bare" in s else []
    if "bare" + LORA in s:
        parts.append(render_lora(res))
    parts.append(render_cpu(res))
    return "\n\n".join(parts)


def own_cpu_ms(row: dict[str, Any]) -> float:
    """CPU ms per step of this benchmark's processes (all but the machine's total and other users')."""
    return sum(v for k, v in row["cpu_ms_per_step"].items() if k not in ("machine (all processes)", "outside this benchmark"))


def render_cpu(res: dict[str, Any]) -> str:
    """Tokens per CPU-second: on a machine others load, wall time follows their load; the CPU a step costs much less."""
    s = res["summary"]
    out = ["CPU time per step of this benchmark's own processes (driver, learner actor, Ray, reaper; /proc), summed over "
           "the windows: what a step costs whatever else runs. Ratio = the family's bare loop's CPU per step over the "
           "variant's (the tokens per step are the same).",
           "",
           "| variant | CPU ms per step | of which the learner (the actor; in-process: the main and torch's threads) | CPU ratio to its bare loop | others' cores, mean |",
           "|:---|---:|---:|---:|---:|"]
    for v in (x for x in ALL_VARIANTS if x in s):
        ref = s["bare" + LORA if is_lora(v) else "bare"]
        cpu = s[v]["cpu_ms_per_step"]
        learner = cpu.get("learner actor", 0.0) or (cpu.get("driver: main loop thread", 0.0)  # in-process: torch's other threads too
                                                    + cpu.get("driver: native threads (Ray core worker, torch)", 0.0))
        s[v]["own_cpu_ms_per_step"] = own_cpu_ms(s[v])
        s[v]["cpu_ratio_to_bare"] = own_cpu_ms(ref) / own_cpu_ms(s[v])
        others = statistics.mean(s[v]["outside_cores"]) if s[v]["outside_cores"] else 0.0
        out.append(f"| `{v}` | {own_cpu_ms(s[v]):.1f} | {learner:.1f} | {s[v]['cpu_ratio_to_bare']:.3f} | {others:.2f} |")
    return "\n".join(out)


def render_lora(res: dict[str, Any]) -> str:
    s, setup = res["summary"], res["setup"]
    lo = setup["lora"]
    variants = [v for v in LORA_VARIANTS if v in s]
    out = [f"**LoRA**: r = {lo['r']}, alpha {lo['alpha']:g}, dropout {lo['dropout']:g}, target modules "
           f"{', '.join(lo['target_modules_resolved'])} ({lo['trainable_parameters']:,} trainable of {setup['parameters']:,} "
           f"parameters); the same model, batch, threads, windows and rounds. Reference: `bare_lora`, the bare loop on "
           f"`peft.get_peft_model` with AdamW over the adapters. Target: daemon >= {TARGET:g} x `bare_lora`.",
           "",
           "| variant | what | tokens/s median [min – max] | ratio to `bare_lora` [min – max] | step ms (mean / median) | "
           "learner ms | wait on ingest ms | checkpoint ms | other ms | target |",
           "|:---|:---|---:|---:|---:|---:|---:|---:|---:|:---|"]
    for v in variants:
        r, t = s[v], twin(v)
        ratio = "1 (reference)" if t == "bare" else f"{r['ratio_to_bare']:.3f} [{r['ratio_to_bare_min']:.3f} – {r['ratio_to_bare_max']:.3f}]"
        tgt = ("met" if r["ratio_to_bare"] >= TARGET else "MISSED") if t.startswith("daemon") else ""
        if t in BARE:
            rest = f"{r['learner_step_ms']:.1f} | - | - | {r['step_ms'] - r['learner_step_ms']:.1f}"
        else:
            rest = f"{r['learner_step_ms']:.1f} | {r['wait_ms']:.2f} | {r['checkpoint_ms']:.1f} | {r['other_ms']:.1f}"
        out.append(f"| `{v}` | {describe(t, res)}, LoRA | {fmt_range(r)} | {ratio} | {r['step_ms']:.1f} / {r['median_step_ms']:.1f} | "
                   f"{rest} | {tgt} |")
    if "lora_over_full_bare" in s:
        out += ["", f"LoRA against full fine-tuning, bare loops of the same round: `bare_lora` / `bare` = "
                    f"{s['lora_over_full_bare']:.2f} x the tokens/s."]
    if setup.get("quiet_below", 0):
        out += ["", "Cores used by other processes during each kept LoRA run: "
                + "; ".join(f"`{v}` " + "/".join(f"{x:.2f}" for x in s[v]["outside_cores"]) for v in variants) + "."]
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> str:
    """Without LoRA runs, throughput_report's plot; with them, tokens/s per family and the daemons' steps."""
    s = res["summary"]
    if "bare" + LORA not in s:
        return plot_full(res, path)
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    families = [(title, [v for v in fam if v in s]) for title, fam in
                (("full fine-tuning", VARIANTS), (f"LoRA r = {res['setup']['lora']['r']}", LORA_VARIANTS))]
    families = [(title, vs) for title, vs in families if vs]
    fig, axes = plt.subplots(1, len(families) + 1, figsize=(5.5 * len(families) + 6.5, 4.8),
                             gridspec_kw={"width_ratios": [1] * len(families) + [1.3]})
    top = max(s[v]["tokens_per_s_max"] for _, vs in families for v in vs) * 1.15
    for ax, (title, vs) in zip(axes, families, strict=False):
        med = [s[v]["tokens_per_s_median"] for v in vs]
        err = [[m - s[v]["tokens_per_s_min"] for v, m in zip(vs, med, strict=True)],
               [s[v]["tokens_per_s_max"] - m for v, m in zip(vs, med, strict=True)]]
        colors = ["#555555" if twin(v) == "bare" else "#888888" if twin(v) == "bare_learner" else
                  {"daemon": "C0", "daemon_no_gates": "C1", "daemon_no_gates_no_ckpt": "C2"}[twin(v)] for v in vs]
        ax.bar(range(len(vs)), med, yerr=err, capsize=4, color=colors)
        ax.axhline(TARGET * s[vs[0]]["tokens_per_s_median"], color="red", linestyle="--", label=f"target: {TARGET:g} x {vs[0]}")
        for i, v in enumerate(vs):
            ratio = 1.0 if twin(v) == "bare" else s[v]["ratio_to_bare"]
            ax.text(i, s[v]["tokens_per_s_max"] * 1.01, f"{ratio:.3f}x", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(vs)), [twin(v).replace("daemon_", "daemon\n").replace("bare_", "bare\n") for v in vs], fontsize=8)
        ax.set_ylim(0, top)
        ax.set_title(f"{title}: {res['model_desc_short']}", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("training tokens/s (median, min–max); label: ratio to its bare loop")
    ax2 = axes[-1]
    w0 = res["setup"]["warmup"]
    for v in [v for _, vs in families for v in vs if twin(v) not in BARE]:
        run = res["runs"][v][0]
        steps = np.arange(w0 + 1, w0 + 1 + len(run["step_seconds"]))
        color = {"daemon": "C0", "daemon_no_gates": "C1", "daemon_no_gates_no_ckpt": "C2"}[twin(v)]
        ax2.plot(steps, run["tokens"] / max(run["steps"], 1) / np.asarray(run["step_seconds"]), lw=0.9, color=color,
                 linestyle="--" if is_lora(v) else "-", label=v)
    ax2.set_xlabel("optimizer step (the window, round 1)")
    ax2.set_ylabel("tokens/s of each step")
    ax2.set_title("Per step (dashed: LoRA); gates and checkpoints show as dips", fontsize=9)
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=7, loc="lower left")
    ax2.grid(True, alpha=0.3)
    return save_figure(plt, fig, path)


# -- main --------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for daemon_throughput.md / .json / .png (default: print only)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps, one round, one shared Ray")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS),
                    help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (the reference of each family chosen, bare or "
                         "bare_lora, is always run)")
    ap.add_argument("--lora-r", type=int, default=None, help="rank of the *_lora variants (default 8)")
    ap.add_argument("--lora-targets", default=None,
                    help="model.lora.target_modules of the *_lora variants: comma-separated names, or all-linear (default: peft's default)")
    ap.add_argument("--name", default="daemon_throughput", help="the output files' name: NAME.md, .json, .png")
    ap.add_argument("--equal-niceness", action="store_true",
                    help="start Ray's workers (the learner actor) at this process's niceness instead of Ray's 15, so on a "
                         "machine others load the daemon's learner competes on the same terms as the bare loops")
    ap.add_argument("--threads", type=int, default=None,
                    help="train.torch_threads of every variant (default: the config's, 2; --quick 1)")
    ap.add_argument("--shared-ray", action=argparse.BooleanOptionalAction, default=None,
                    help="one local Ray for every daemon run instead of each daemon starting its own (default: on with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="daemon steps before the window (W)")
    ap.add_argument("--measure", type=int, default=None, help="daemon steps in the window (M)")
    ap.add_argument("--bare-steps", type=int, default=None)
    ap.add_argument("--quiet-below", type=float, default=None,
                    help="before each run, wait (up to --quiet-timeout s) until other processes use fewer cores than this "
                         "(default 0.15; --quick: 0, do not wait)")
    ap.add_argument("--quiet-timeout", type=float, default=900.0)
    ap.add_argument("--max-outside", type=float, default=None,
                    help="redo a run during which other processes used more cores than this on average "
                         "(default 0.25; --quick: never), at most --retries times")
    ap.add_argument("--retries", type=int, default=None)
    ap.add_argument("--work-dir", type=Path, default=None, help="where the stream and run directories go (default: a temporary folder, removed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from everlearn.learners import build_model, build_tokenizer

    setup = QUICK if args.quick else FULL
    setup = Setup(**{**setup.__dict__})
    if args.warmup is not None:
        setup.warmup = args.warmup
    if args.measure is not None:
        setup.measure = args.measure
    if args.bare_steps is not None:
        setup.bare_steps = args.bare_steps
    if args.shared_ray is not None:
        setup.shared_ray = args.shared_ray
    if args.threads is not None:
        setup.overrides = [o for o in setup.overrides if not o.startswith("train.torch_threads=")] + [f"train.torch_threads={args.threads}"]
    for name in ("quiet_below", "max_outside", "retries", "lora_r", "lora_targets"):
        if getattr(args, name) is not None:
            setattr(setup, name, getattr(args, name))
    repeats = args.repeats or (1 if args.quick else 3)
    chosen = {v for v in args.variants.split(",") if v}
    unknown = chosen - set(ALL_VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    chosen |= {"bare" + LORA if is_lora(v) else "bare" for v in chosen} or {"bare"}  # each family's reference
    variants = [v for v in ALL_VARIANTS if v in chosen]

    t_start = time.perf_counter()
    if args.equal_niceness:
        os.environ[NICENESS_ENV] = str(os.getpriority(os.PRIO_PROCESS, 0))
    import ray
    import torch

    info = machine_info(torch=torch.__version__, ray=ray.__version__, numpy=np.__version__)
    print(f"machine: {info['nproc']} cpus ({info['cpu']}), load average {info['loadavg_at_start'][0]:.2f}, "
          f"python {info['python']}, torch {info['torch']}, ray {info['ray']}" + ("  [--quick]" if args.quick else ""), flush=True)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="everlearn-dt-"))
    work.mkdir(parents=True, exist_ok=True)
    stream = work / "stream"
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    rounds: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    try:
        cfg = make_config(setup, work / "probe", stream, setup.gate_every, setup.ckpt_every)
        cfg_lora = make_config(setup, work / "probe", stream, setup.gate_every, setup.ckpt_every, lora=True)
        seeded = seed_stream(cfg, setup, stream)
        m = cfg.model
        n_params = sum(p.numel() for p in build_model(m, build_tokenizer(m)).parameters())
        lora_model = bare_lora_model(build_model(m, build_tokenizer(m)), cfg_lora.model.lora)
        n_lora = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
        lora_targets = sorted(lora_model.peft_config["default"].target_modules)
        del lora_model
        if setup.shared_ray and any(twin(v) not in BARE for v in variants):
            from everlearn.daemon.runtime import start_ray

            start_ray(cfg)
        run_no = 0
        for rnd in range(repeats):
            order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
            for v in order:
                for attempt in range(setup.retries + 1):
                    run_no += 1
                    waited, quiet = wait_quiet(setup.quiet_below, args.quiet_timeout) if setup.quiet_below > 0 else (0.0, None)
                    load = os.getloadavg()[0]
                    print(f"round {rnd + 1}/{repeats}: {v} (load average {load:.2f}"
                          + (f", waited {waited:.0f} s for other processes < {setup.quiet_below:g} cores" if waited >= 3.5 else "")
                          + ") ...", end=" ", flush=True)
                    fam_cfg = cfg_lora if is_lora(v) else cfg
                    if twin(v) == "bare":
                        r = run_bare(fam_cfg, setup, args.seed + rnd)
                    elif twin(v) == "bare_learner":
                        r = run_bare_learner(fam_cfg, setup, args.seed + rnd, work)
                    else:
                        r = run_daemon(v, setup, work, stream, run_no)
                    outside = r["cpu_seconds"]["outside this benchmark"] / r["seconds"]
                    r.update(round=rnd, attempt=attempt, loadavg_before=load, waited_for_quiet_s=waited,
                             outside_cores_before=quiet, outside_cores=outside)
                    extra = "" if twin(v) in BARE else (f", learner {1e3 * r['learner_seconds'] / r['steps']:.1f} ms/step, "
                                                  f"wait {r['registry']['train_wait_seconds']:.2f} s, start-up {r['startup_seconds']:.1f} s")
                    print(f"{r['tokens_per_s']:,.0f} tokens/s ({1e3 * r['seconds'] / r['steps']:.1f} ms/step{extra}; "
                          f"other processes {outside:.2f} cores)", flush=True)
                    if outside <= setup.max_outside or attempt == setup.retries:
                        r["disturbed"] = outside > setup.max_outside
                        runs[v].append(r)
                        break
                    print(f"  other processes used {outside:.2f} > {setup.max_outside:g} cores: measuring again", flush=True)
                    discarded.append({"variant": v, **{k: r[k] for k in ("round", "attempt", "tokens_per_s", "outside_cores")}})
            rounds.append({"round": rnd, "order": order})
    finally:
        import ray

        if ray.is_initialized():  # the shared Ray: shut down with its reaper, as the daemon does its own
            from everlearn.daemon.runtime import stop_ray

            stop_ray()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    tc = cfg.train
    res: dict[str, Any] = {
        "command": command_line(), "quick": args.quick, "machine": info, "date": time.strftime("%Y-%m-%d"),
        "setup": {**{k: v for k, v in setup.__dict__.items() if k not in ("overrides", "extra")},
                  "ray_worker_niceness": os.environ.get(NICENESS_ENV, "Ray's default (15)"),
                  "overrides": setup.overrides, "batch_size": tc.batch_size, "seq_len": tc.seq_len,
                  "torch_threads": tc.torch_threads, "model": m.model_dump(), "parameters": n_params, "repeats": repeats,
                  "ray_num_cpus": cfg.ray.num_cpus, "serve_enabled": False, "stream": seeded,
                  "lora": {**cfg_lora.model.lora.model_dump(mode="json"), "target_modules_resolved": lora_targets,
                           "trainable_parameters": n_lora}},
        "model_desc": f"{m.num_layers} x {m.hidden_size} Llama ({n_params / 1e6:.1f}M parameters)",
        "model_desc_short": f"{m.num_layers}x{m.hidden_size} Llama, batch {tc.batch_size}x{tc.seq_len}, {tc.torch_threads} threads",
        "target": TARGET, "before_restructure": BEFORE_RESTRUCTURE,
        "runs": runs, "discarded": discarded,
    }
    res["summary"] = summarize_families(runs, rounds)
    report(res, args.out, args.name, title="Daemon training throughput vs a bare PyTorch loop",
           intro="Serving is off (`serve.enabled: false`): it is not on the training path. "
                 "Tokens are those that carry a loss (`StepStats.tokens`).",
           versions={"torch": "torch", "Ray": "ray"},
           setting=f"Ray: local, num_cpus = {cfg.ray.num_cpus}, "
                   f"{'one shared Ray for every daemon run' if setup.shared_ray else 'started by each daemon run'}. "
                   f"Run on {res['date']}. ",
           render=render, plot=plot, image_alt="tokens/s per variant",
           raw_note=" (every run, per-step times, CPU by process)", t_start=t_start, script="daemon_throughput")
    return res


if __name__ == "__main__":
    main()
