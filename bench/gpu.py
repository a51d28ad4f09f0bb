"""Benchmark of the learner on a GPU: bf16 loss parity with fp32, and model FLOPs utilisation against a bare loop.

It measures and reports; it never asserts a timing (the targets are shown next
to the numbers, marked met or missed). It is for a machine with a CUDA GPU; it
prints the card's name first. Without CUDA only ``--quick`` runs (on the CPU, a
tiny model: the code paths, not the numbers).

What is measured
----------------
``parity``
    The same ``--parity-steps`` (20) batches of real text (Python standard-library
    sources, byte tokens, ``--parity-batch`` 8 x ``--parity-seq-len`` 256) through a
    ``Learner`` of the embedded default model (``ModelConfig()``, 4 x 256 Llama,
    3.4M parameters, the default schedule and AdamW) three times, each from the
    same initial weights: on the CPU in float32 (``train.device=cpu``,
    ``precision=fp32``: the reference), on the GPU in float32, and on the GPU
    under bfloat16 autocast (``train.device=cuda``, ``precision=bf16``: weights,
    gradients and AdamW stay float32, the matrix products run in bf16). Reported:
    every step's loss and its relative difference to the reference.

    Tolerance: every step's bf16 loss within 1 % of the fp32 loss (relative).
    Why 1 %: bfloat16 keeps an 8-bit significand, about 2.4 significant decimal
    digits (unit roundoff 2^-8, 0.39 %), so a single bf16 rounding of the loss
    itself could already move it by 0.4 %. The loss is the mean over thousands of
    tokens of a float32 cross-entropy of bf16 logits, so per-token rounding
    errors mostly cancel, but every step's update differs slightly and the
    weights drift apart over the steps. 1 % (2.5 unit roundoffs) leaves room for
    that drift and for the GPU's own kernels (flash attention, other summation
    orders) while it still catches what matters: a layer left in the wrong
    precision, a mask or loss scaled wrongly, an update applied twice, which
    all move the loss by several percent within a few steps. Measured on the
    development machine's CPU (fp32 against CPU bf16 autocast, the same model,
    batches and steps: ``--quick --no-mfu --parity-model default --parity-steps 20
    --parity-batch 8 --parity-seq-len 256``): at most 0.017 % apart.
``mfu``
    A Llama of about 125M parameters (``--hidden`` 768, ``--layers`` 12, 12 heads,
    intermediate 2,048, ``--vocab`` 32,000 untied: 134M parameters, 110M of them
    outside the input embedding; saved with ``save_pretrained`` into a temporary
    directory and loaded by ``model.name_or_path``, with the byte tokenizer), batch
    ``--batch`` 16 x ``--seq-len`` 1,024 of random byte ids, bf16 autocast, SDPA
    attention, ``--steps`` (100) timed steps after ``--warmup`` (10):

    ``bare``: a plain loop in this process: the model on the GPU, AdamW over all
    parameters (torch's default implementation, the learner's hyper-parameters),
    per step the batch from pinned host memory to the GPU, the forward under
    autocast, the summed float32 cross-entropy over the predicted tokens divided
    by their count (what ``Learner._loss_sum`` / ``train_step`` compute), backward,
    ``clip_grad_norm_``, ``step``, ``zero_grad(set_to_none=True)``, the loss read
    back (``loss.item()``). ``learner``: ``Learner.train_step`` in this process,
    the same batches. ``learner_actor``: the learner as the daemon's train stage
    runs it: a Ray actor (``ray.remote(Learner)``, ``num_gpus=1``), one
    ``ray.get(train_step.remote(tokens, lengths))`` per step from this process.
    ``--compile``: ``torch.compile`` for all three (``train.compile``).

    Tokens/s counts every position of every row (the FLOPs are spent on all of
    them). MFU = 6 x N x tokens/s / the card's peak dense bf16 FLOPS, with N the
    parameters outside the input embedding (a lookup, no multiply-adds; the LM
    head is counted); attention's own FLOPs (12 x layers x hidden x seq_len per
    token, +17 % here) are not counted, as in the usual 6N estimate, so MFU is
    conservative. Achieved TFLOPS = 6 x N x tokens/s. The peak comes from
    ``PEAK_BF16_TFLOPS`` keyed by ``torch.cuda.get_device_name()``; for a card not
    in it, MFU is n/a and achieved TFLOPS is still reported. Each variant runs
    ``--repeats`` (3; 1 with ``--compile``) interleaved rounds; reported: median
    [min - max]; ratio = median over rounds of (variant / bare of the same round).

    Target: learner MFU >= 0.9 x bare's (equivalently tokens/s: same model, same
    card).

Command (from the repository root, on a machine with a CUDA GPU; about 2-5
minutes)::

    .venv/bin/python bench/gpu.py --out docs/bench

writes docs/bench/gpu.md, .json and .png. ``--quick``: a tiny model (2 x 64) for
parity (5 steps of 4 x 64) and for the MFU variants (batch 4 x 64, 3 + 5 steps,
one round, the byte vocabulary); without CUDA it compares CPU fp32 with CPU bf16
autocast and reports MFU as n/a. CPU results are never written to docs/bench.
"""

import argparse
import gc
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import NO_PLOT, command_line, machine_info, pyplot, report, save_figure  # noqa: E402 (bench/ is not a package)

# Peak dense (no sparsity) bf16 tensor-core TFLOPS from the vendors' data sheets, matched in this order against
# torch.cuda.get_device_name() (case-insensitive, whole words). A card not here: MFU n/a.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"h200 nvl", 835.0), (r"gh200|h200", 989.0),  # H200 SXM, GH200: 989
    (r"h100 nvl", 835.0), (r"h100 pcie", 756.0), (r"h100|h800", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM card
    (r"b200", 2250.0), (r"a100|a800", 312.0), (r"l40s", 362.0), (r"l40", 181.0), (r"l4", 121.0), (r"a10", 125.0),
    (r"rtx 4090", 165.2),
]
PARITY_TOLERANCE = 0.01  # relative, per step; the docstring says why
MFU_TARGET = 0.9  # learner over bare
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128}
VARIANTS = ("bare", "learner", "learner_actor")
DOCS_BENCH = Path(__file__).resolve().parents[1] / "docs" / "bench"


def peak_tflops(name: str) -> float | None:
    low = name.lower()
    return next((tf for pat, tf in PEAK_BF16_TFLOPS if re.search(rf"\b(?:{pat})\b", low)), None)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- parity --------------------------------------------------------------------
def text_batches(tokenizer, n: int, batch: int, seq: int) -> np.ndarray:
    from everlearn.daemon import demo

    need = n * batch * seq
    text = "".join(t for _, t in demo.take(demo.python_sources(), need + 4096))
    ids = tokenizer.encode(text)
    if len(ids) < need:
        raise RuntimeError(f"only {len(ids)} tokens of Python sources found; {need} needed")
    return ids[:need].reshape(n, batch, seq)


def parity(a: argparse.Namespace, device, tmp: Path) -> dict[str, Any]:
    from everlearn.learners import (
        Learner,
        ModelConfig,
        ScheduleConfig,
        TrainConfig,
        build_tokenizer,
    )

    model_cfg = ModelConfig(**(TINY if a.parity_model == "tiny" else {}))
    batches = text_batches(build_tokenizer(model_cfg), a.parity_steps, a.parity_batch, a.parity_seq_len)
    runs = [("cpu", "fp32")] + ([("cuda", "fp32"), ("cuda", "bf16")] if device.type == "cuda" else [("cpu", "bf16")])
    threads = min(8, os.cpu_count() or 1)
    out: dict[str, Any] = {"model": model_cfg.model_dump(), "batch": a.parity_batch, "seq_len": a.parity_seq_len,
                           "steps": a.parity_steps, "tolerance_rel": PARITY_TOLERANCE, "cpu_threads": threads, "runs": {}}
    for dev, prec in runs:
        train_cfg = TrainConfig(seq_len=a.parity_seq_len, batch_size=a.parity_batch, device=dev, precision=prec, torch_threads=threads)
        learner = Learner(model_cfg, train_cfg, ScheduleConfig(), str(tmp / f"parity-{dev}-{prec}"))
        t0 = time.perf_counter()
        stats = [learner.train_step(b) for b in batches]
        seconds = time.perf_counter() - t0
        skipped = [s.skipped for s in stats if s.skipped]
        if skipped:
            raise RuntimeError(f"parity {dev} {prec}: steps skipped: {skipped}")
        out["runs"][f"{dev} {prec}"] = {"losses": [s.loss for s in stats], "grad_norms": [s.grad_norm for s in stats], "seconds": seconds}
        print(f"parity: {dev} {prec}: losses {stats[0].loss:.4f} -> {stats[-1].loss:.4f} in {seconds:.1f} s", flush=True)
        del learner
        free(device)
    ref = np.asarray(out["runs"]["cpu fp32"]["losses"])
    for run in out["runs"].values():
        rel = np.abs(np.asarray(run["losses"]) - ref) / np.abs(ref)
        run["rel_diff"] = rel.tolist()
        run["max_rel_diff"] = float(rel.max())
    bf16 = next(k for k in out["runs"] if k.endswith("bf16"))
    out["bf16_run"] = bf16
    out["max_rel_diff"] = out["runs"][bf16]["max_rel_diff"]
    out["within_tolerance"] = bool(out["max_rel_diff"] <= PARITY_TOLERANCE)
    return out


# -- MFU -------------------------------------------------------------------------
def mfu_model(a: argparse.Namespace, tmp: Path):
    """The ModelConfig of the MFU model: built from numbers (byte vocabulary), or saved with a larger vocabulary."""
    from everlearn.learners import ModelConfig

    dims = TINY if a.quick else {"hidden_size": a.hidden, "num_layers": a.layers, "num_heads": a.heads,
                                 "intermediate_size": a.intermediate, "max_position_embeddings": max(a.seq_len, 1024)}
    if not a.vocab:
        return ModelConfig(**dims)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=a.vocab, hidden_size=dims["hidden_size"], intermediate_size=dims["intermediate_size"],
                         num_hidden_layers=dims["num_layers"], num_attention_heads=dims["num_heads"],
                         num_key_value_heads=dims["num_heads"], max_position_embeddings=dims["max_position_embeddings"],
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    path = tmp / "mfu-model"
    model.save_pretrained(path)
    del model
    return ModelConfig(name_or_path=str(path), attn_implementation="sdpa")


def random_batches(a: argparse.Namespace, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 259, size=(a.batch, a.seq_len), dtype=np.int32) for _ in range(n)]


def time_steps(step, a: argparse.Namespace, device) -> dict[str, Any]:
    for i in range(a.warmup):
        step(i)
    sync(device)
    t_prev = t0 = time.perf_counter()
    times = []
    for i in range(a.warmup, a.warmup + a.steps):
        step(i)  # every variant reads its loss back: the step has finished on the device
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = a.steps * a.batch * a.seq_len
    return {"steps": a.steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "step_ms": [round(1e3 * t, 4) for t in times], "median_step_ms": 1e3 * statistics.median(times)}


def run_bare(model_cfg, train_cfg, schedule_cfg, a: argparse.Namespace, device, seed: int) -> dict[str, Any]:
    import contextlib

    import torch
    import torch.nn.functional as F

    from everlearn.learners import InfiniteSchedule, build_model, build_tokenizer

    torch.set_num_threads(train_cfg.torch_threads)
    torch.manual_seed(train_cfg.seed)
    model = build_model(model_cfg, build_tokenizer(model_cfg)).to(device)
    model.train()
    net = torch.compile(model, backend=train_cfg.compile_backend) if train_cfg.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = InfiniteSchedule(schedule_cfg)
    opt = torch.optim.AdamW(params, lr=schedule(0), betas=(train_cfg.beta1, train_cfg.beta2), weight_decay=train_cfg.weight_decay)
    batches = random_batches(a, 8, seed)
    bf16 = train_cfg.precision == "bf16"

    def step(i: int) -> None:
        for group in opt.param_groups:
            group["lr"] = schedule(i)
        ids = torch.from_numpy(batches[i % len(batches)].astype(np.int64))
        if device.type == "cuda":
            ids = ids.pin_memory().to(device, non_blocking=True)
        mask = torch.ones_like(ids, dtype=torch.bool)  # full windows, as the learner's mask for them
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = net(input_ids=ids, attention_mask=mask.long()).logits
        logits = logits[:, :-1].float()
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        (loss_sum / (ids.shape[0] * (ids.shape[1] - 1))).backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = time_steps(step, a, device)
    if device.type == "cuda":
        res["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res  # the model and optimizer go with this frame


def run_learner(model_cfg, train_cfg, schedule_cfg, a: argparse.Namespace, device, seed: int, tmp: Path) -> dict[str, Any]:
    import torch

    from everlearn.learners import Learner

    learner = Learner(model_cfg, train_cfg, schedule_cfg, str(tmp / "learner-store"))
    batches = random_batches(a, 8, seed)
    inner: list[float] = []

    def step(i: int) -> None:
        stats = learner.train_step(batches[i % len(batches)])
        if stats.skipped:
            raise RuntimeError(f"learner: step skipped: {stats.skipped}")
        inner.append(stats.seconds)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = time_steps(step, a, device)
    res["learner_ms"] = 1e3 * statistics.median(inner[a.warmup :])
    if device.type == "cuda":
        res["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res


def run_actor(model_cfg, train_cfg, schedule_cfg, a: argparse.Namespace, device, seed: int, tmp: Path) -> dict[str, Any]:
    import ray

    from everlearn.learners import Learner

    gpus = 1 if device.type == "cuda" else 0
    actor = ray.remote(Learner).options(num_cpus=1, num_gpus=gpus, max_restarts=0).remote(
        model_cfg, train_cfg, schedule_cfg, str(tmp / "actor-store"))
    batches = random_batches(a, 8, seed)
    lengths = np.full(a.batch, a.seq_len, dtype=np.int32)
    inner: list[float] = []
    try:
        def step(i: int) -> None:  # what the train stage does: ray.get of the actor's train_step, per step
            stats = ray.get(actor.train_step.remote(batches[i % len(batches)], lengths))
            if stats.skipped:
                raise RuntimeError(f"learner_actor: step skipped: {stats.skipped}")
            inner.append(stats.seconds)

        res = time_steps(step, a, device)
    finally:
        ray.kill(actor)
    res["learner_ms"] = 1e3 * statistics.median(inner[a.warmup :])
    return res


def mfu(a: argparse.Namespace, device, tmp: Path, peak: float | None) -> dict[str, Any]:
    from everlearn.learners import ScheduleConfig, TrainConfig, build_model, build_tokenizer

    model_cfg = mfu_model(a, tmp)
    model = build_model(model_cfg, build_tokenizer(model_cfg))
    total = sum(p.numel() for p in model.parameters())
    n_flop = total - model.get_input_embeddings().weight.numel()  # the input embedding is a lookup
    cfg = model.config
    del model
    train_cfg = TrainConfig(seq_len=a.seq_len, batch_size=a.batch, device=device.type, precision=a.precision, compile=a.compile,
                            torch_threads=min(8, os.cpu_count() or 1) if device.type == "cpu" else 2)
    schedule_cfg = ScheduleConfig()
    print(f"mfu: {total / 1e6:.1f}M parameters ({n_flop / 1e6:.1f}M outside the input embedding), batch {a.batch} x {a.seq_len}, "
          f"{a.precision}{', compiled' if a.compile else ''}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in a.variants}
    if "learner_actor" in a.variants:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only Ray
        import ray

        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=256 * 2**20)
    try:
        for rnd in range(a.repeats):
            order = a.variants[rnd % len(a.variants):] + a.variants[: rnd % len(a.variants)]
            for v in order:
                print(f"round {rnd + 1}/{a.repeats}: {v} ...", end=" ", flush=True)
                if v == "bare":
                    r = run_bare(model_cfg, train_cfg, schedule_cfg, a, device, rnd)
                elif v == "learner":
                    r = run_learner(model_cfg, train_cfg, schedule_cfg, a, device, rnd, tmp)
                else:
                    r = run_actor(model_cfg, train_cfg, schedule_cfg, a, device, rnd, tmp)
                free(device)
                r["round"] = rnd
                r["tflops"] = 6 * n_flop * r["tokens_per_s"] / 1e12
                r["mfu"] = r["tflops"] / peak if peak else None
                runs[v].append(r)
                print(f"{r['tokens_per_s']:,.0f} tokens/s ({r['median_step_ms']:.1f} ms/step median), {tflops(r['tflops'])} TFLOPS"
                      + (f", MFU {100 * r['mfu']:.1f} %" if peak else ""), flush=True)
    finally:
        if "learner_actor" in a.variants:
            import ray

            ray.shutdown()
    summary: dict[str, Any] = {}
    for v, rs in runs.items():
        tps = [r["tokens_per_s"] for r in rs]
        ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rs, runs["bare"], strict=False)]
        med = statistics.median(tps)
        summary[v] = {"tokens_per_s_median": med, "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
                      "tflops": 6 * n_flop * med / 1e12, "mfu": 6 * n_flop * med / 1e12 / peak if peak else None,
                      "ratio_to_bare": statistics.median(ratios), "ratio_to_bare_min": min(ratios), "ratio_to_bare_max": max(ratios),
                      "median_step_ms": statistics.median(x for r in rs for x in r["step_ms"]),
                      "max_memory_gib": max((r.get("max_memory_gib") or 0.0) for r in rs) or None}
    return {"model": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "intermediate_size")},
            "name_or_path": "saved LlamaForCausalLM (save_pretrained)" if model_cfg.name_or_path else "built from ModelConfig",
            "parameters": total, "flop_parameters": n_flop, "batch": a.batch, "seq_len": a.seq_len, "precision": a.precision,
            "compile": a.compile, "warmup": a.warmup, "steps": a.steps, "repeats": a.repeats, "peak_tflops": peak,
            "attention_flops_share": 12 * cfg.num_hidden_layers * cfg.hidden_size * a.seq_len / (6 * n_flop),
            "runs": runs, "summary": summary}


# -- report ----------------------------------------------------------------------
def tflops(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def render(res: dict[str, Any]) -> str:
    p, m = res["parity"], res.get("mfu")
    ref = p["runs"]["cpu fp32"]["losses"]
    out = [f"Card: **{res['device_name']}** (peak dense bf16: "
           + (f"{res['peak_tflops']:g} TFLOPS" if res["peak_tflops"] else "not in the table: MFU n/a") + ").",
           "",
           f"**Loss parity**: {p['model']['num_layers']} x {p['model']['hidden_size']} Llama, the same {p['steps']} batches of "
           f"{p['batch']} x {p['seq_len']} text tokens from the same initial weights. Tolerance: every step's bf16 loss within "
           f"{100 * p['tolerance_rel']:g} % (relative) of CPU fp32's.",
           "",
           "| run | loss at step 1 | loss at the last step | max relative difference to CPU fp32 | seconds | tolerance |",
           "|:---|---:|---:|---:|---:|:---|"]
    for name, run in p["runs"].items():
        tol = ("met" if run["max_rel_diff"] <= p["tolerance_rel"] else "MISSED") if name == p["bf16_run"] else ""
        diff = "(reference)" if name == "cpu fp32" else f"{100 * run['max_rel_diff']:.4f} %"
        out.append(f"| {name} | {run['losses'][0]:.4f} | {run['losses'][-1]:.4f} | {diff} | {run['seconds']:.1f} | {tol} |")
    out += ["", "Per step (CPU fp32 / " + p["bf16_run"] + "): "
            + ", ".join(f"{x:.4f}/{y:.4f}" for x, y in zip(ref, p["runs"][p["bf16_run"]]["losses"], strict=True)) + "."]
    if m:
        s = m["summary"]
        out += ["",
                f"**MFU**: Llama {m['model']['num_hidden_layers']} x {m['model']['hidden_size']}, {m['model']['num_attention_heads']} heads, "
                f"intermediate {m['model']['intermediate_size']}, vocabulary {m['model']['vocab_size']:,} "
                f"({m['parameters'] / 1e6:.1f}M parameters, N = {m['flop_parameters'] / 1e6:.1f}M outside the input embedding); "
                f"batch {m['batch']} x {m['seq_len']}, {m['precision']}{', torch.compile' if m['compile'] else ''}; "
                f"{m['steps']} timed steps after {m['warmup']}, {m['repeats']} interleaved round{'s' if m['repeats'] > 1 else ''}. "
                f"MFU = 6 N tokens/s / peak (attention's FLOPs, +{100 * m['attention_flops_share']:.0f} %, not counted). "
                f"Target: learner MFU >= {MFU_TARGET:g} x bare.",
                "",
                "| variant | what | tokens/s median [min – max] | median step ms | achieved TFLOPS | MFU | ratio to bare [min – max] | peak memory GiB | target |",
                "|:---|:---|---:|---:|---:|---:|---:|---:|:---|"]
        what = {"bare": "plain bf16 loop (reference)", "learner": "`Learner.train_step` in-process",
                "learner_actor": "the learner as a Ray actor, `ray.get` per step (as the train stage runs it)"}
        for v, r in s.items():
            mfu_s = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
            ratio = "1 (reference)" if v == "bare" else f"{r['ratio_to_bare']:.3f} [{r['ratio_to_bare_min']:.3f} – {r['ratio_to_bare_max']:.3f}]"
            tgt = "" if v == "bare" else ("met" if r["ratio_to_bare"] >= MFU_TARGET else "MISSED")
            mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] else "-"
            out.append(f"| `{v}` | {what[v]} | {r['tokens_per_s_median']:,.0f} [{r['tokens_per_s_min']:,.0f} – {r['tokens_per_s_max']:,.0f}] | "
                       f"{r['median_step_ms']:.1f} | {tflops(r['tflops'])} | {mfu_s} | {ratio} | {mem} | {tgt} |")
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    p, m = res["parity"], res.get("mfu")
    fig, axes = plt.subplots(1, 2 if m else 1, figsize=(13 if m else 6.5, 4.6), squeeze=False)
    ax = axes[0][0]
    steps = np.arange(1, p["steps"] + 1)
    for (name, run), style in zip(p["runs"].items(), ["-", "--", ":"], strict=False):
        ax.plot(steps, run["losses"], style, marker="o", ms=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"Loss parity ({p['model']['num_layers']}x{p['model']['hidden_size']}); right: relative difference", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    twin = ax.twinx()
    twin.plot(steps, 100 * np.asarray(p["runs"][p["bf16_run"]]["rel_diff"]), color="C3", lw=0.8, alpha=0.7)
    twin.axhline(100 * p["tolerance_rel"], color="C3", linestyle="--", lw=0.8)
    twin.set_ylabel(f"|{p['bf16_run']} - cpu fp32| / cpu fp32, % (dashed: tolerance)", color="C3", fontsize=8)
    twin.set_ylim(0, 100 * p["tolerance_rel"] * 1.2)
    if m:
        ax = axes[0][1]
        s = m["summary"]
        vs = list(s)
        use_mfu = all(s[v]["mfu"] is not None for v in vs)
        vals = [100 * s[v]["mfu"] if use_mfu else s[v]["tokens_per_s_median"] for v in vs]
        ax.bar(range(len(vs)), vals, color=["#555555", "C0", "C1"][: len(vs)])
        ax.axhline(MFU_TARGET * vals[0], color="red", linestyle="--", label=f"target: {MFU_TARGET:g} x bare")
        for i, v in enumerate(vs):
            ax.text(i, vals[i] * 1.01, f"{s[v]['ratio_to_bare']:.3f}x", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(vs)), vs)
        ax.set_ylabel("MFU, %" if use_mfu else "tokens/s (MFU n/a on this device)")
        ax.set_title(f"{res['device_name']}: {m['parameters'] / 1e6:.1f}M Llama, {m['precision']}, batch {m['batch']}x{m['seq_len']}", fontsize=9)
        ax.set_ylim(0, max(vals) * 1.15)
        ax.legend(loc="lower right", fontsize=8)
    return save_figure(plt, fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu.md / .json / .png (default: print only)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, a few steps (on the CPU without CUDA)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA when visible")
    ap.add_argument("--compile", action="store_true", help="torch.compile the MFU variants (train.compile)")
    ap.add_argument("--steps", type=int, default=None, help="timed MFU steps per run (default 100; --quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed MFU steps first (default 10, 20 with --compile; --quick 3)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved MFU rounds (default 3, 1 with --compile; --quick 1)")
    ap.add_argument("--seq-len", type=int, default=None, help="MFU sequence length (default 1024; --quick 64)")
    ap.add_argument("--batch", type=int, default=None, help="MFU batch rows (default 16; --quick 4)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=None, help="MFU model vocabulary (default 32000; 0: the byte tokenizer's; --quick 0)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="MFU variants (bare always runs)")
    ap.add_argument("--no-mfu", action="store_true", help="parity only")
    ap.add_argument("--parity-model", choices=["default", "tiny"], default=None,
                    help="default: ModelConfig() (4 x 256); tiny: 2 x 64 (default with --quick)")
    ap.add_argument("--parity-steps", type=int, default=None, help="default 20; --quick 5")
    ap.add_argument("--parity-batch", type=int, default=None, help="default 8; --quick 4")
    ap.add_argument("--parity-seq-len", type=int, default=None, help="default 256; --quick 64")
    ap.add_argument("--name", default="gpu", help="the output files' name: NAME.md, .json, .png")
    a = ap.parse_args(argv)
    q = a.quick
    a.steps = a.steps or (5 if q else 100)
    a.warmup = a.warmup if a.warmup is not None else (3 if q else 20 if a.compile else 10)
    a.repeats = a.repeats or (1 if q or a.compile else 3)
    a.seq_len, a.batch = a.seq_len or (64 if q else 1024), a.batch or (4 if q else 16)
    a.vocab = (0 if q else 32000) if a.vocab is None else a.vocab
    a.parity_steps, a.parity_batch = a.parity_steps or (5 if q else 20), a.parity_batch or (4 if q else 8)
    a.parity_seq_len = a.parity_seq_len or (64 if q else 256)
    a.parity_model = a.parity_model or ("tiny" if q else "default")
    a.variants = ["bare", *(v for v in VARIANTS if v in a.variants and v != "bare")]
    import torch

    cuda = torch.cuda.is_available()
    if a.device == "cuda" and not cuda:
        ap.error("--device cuda, but torch sees no CUDA GPU")
    device = torch.device("cuda" if a.device != "cpu" and cuda else "cpu")
    if device.type == "cpu" and not q:
        ap.error("no CUDA GPU here (or --device cpu): the full run is for a GPU machine; --quick runs a CPU smoke run")
    if device.type == "cpu" and a.out is not None and a.out.resolve() == DOCS_BENCH.resolve():
        ap.error(f"a CPU smoke run is not the GPU benchmark: write it elsewhere than {DOCS_BENCH}")
    t_start = time.perf_counter()
    gpu: dict[str, Any] = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"gpu": torch.cuda.get_device_name(device), "gpu_memory_gib": round(props.total_memory / 2**30, 1),
               "cuda": torch.version.cuda, "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
               "gpus_visible": torch.cuda.device_count()}
    device_name = gpu.get("gpu", "CPU (no CUDA)")
    peak = peak_tflops(device_name) if device.type == "cuda" else None
    info = machine_info(torch=torch.__version__, **{k: str(v) for k, v in gpu.items()})
    print(f"device: {device_name}" + (f" ({gpu['gpu_memory_gib']} GiB, CUDA {gpu['cuda']}, capability {gpu['capability']})" if gpu else "")
          + f"; peak dense bf16: {f'{peak:g} TFLOPS' if peak else 'unknown (MFU n/a)'}", flush=True)
    print(f"machine: {info['nproc']} cpus, load average {info['loadavg_at_start'][0]:.2f}, torch {torch.__version__}"
          + ("  [--quick]" if q else ""), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="everlearn-gpu-"))
    try:
        res: dict[str, Any] = {"command": command_line(), "quick": q, "machine": info, "date": time.strftime("%Y-%m-%d"),
                               "device": device.type, "device_name": device_name, "peak_tflops": peak,
                               "targets": {"parity_tolerance_rel": PARITY_TOLERANCE, "learner_over_bare_mfu": MFU_TARGET}}
        res["parity"] = parity(a, device, tmp)
        if not a.no_mfu:
            res["mfu"] = mfu(a, device, tmp, peak)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    report(res, a.out, a.name, title="The learner on a GPU: bf16 loss parity and MFU",
           intro="Peak FLOPS from the table in bench/gpu.py (dense bf16, from the vendors' data sheets).",
           versions={"torch": "torch", **({"GPU": "gpu", "CUDA": "cuda"} if gpu else {})}, setting=f"Run on {res['date']}. ",
           render=render, plot=plot, image_alt="loss parity per step; MFU per variant",
           raw_note=" (every step's loss and time)", t_start=t_start, script="gpu")
    return res


if __name__ == "__main__":
    main()
