"""Benchmark of swapping the served model: a LoRA adapter against full weights, on the same model.

It measures and reports; it never asserts a timing.

What is measured
----------------
For each model (``--models``: ``default``, the embedded default ``ModelConfig()``,
a 4 x 256 Llama, 3.4M parameters; ``large``, ``ModelConfig(hidden_size=768,
num_layers=12, num_heads=12, intermediate_size=2048)``, 85M parameters, built
from config with the byte tokenizer), a ``Learner`` with full fine-tuning and one
with LoRA (``--lora-r``, 8; the other ``model.lora`` fields at their defaults:
alpha 16, peft's default target modules for Llama, q_proj and v_proj) each take
two training steps and commit a checkpoint after each, into a local store of
their own. So there are two full-weights checkpoints (``model.safetensors``) and
two LoRA ones (``adapter.safetensors`` + ``base.json``) of the same base.

``base``
    What a process pays once per base, not per swap: ``Models(cfg, tokenizer).base``
    (build the model from config: allocate and initialise every weight) and
    ``Models.identity`` (the sha256 of the base's weights that every adapter is
    checked against). Timed once per model.
``load``
    ``Models.load(store, ref)``, what serving and the evaluator call for each
    checkpoint they take: the manifest, the file read and checked against it,
    then, for full weights, a copy of the base with the weights loaded over it;
    for LoRA, a module tree sharing the base's tensors with the adapters injected
    and loaded. The first load of each kind in the process is reported apart;
    then ``--repeats`` loads of each kind, interleaved
    (full, LoRA, full, ...), each of the kind's two checkpoints in turn; the
    loaded model is dropped (and garbage-collected) between loads, outside the
    timing. Reported: median and p90, and the bytes of tensors the loaded model
    holds that are not the base's (what each version held costs in memory).
``replica``
    The end-to-end swap in a real serving replica: ``deploy/serving.py``
    ``LanguageModelServer`` in this process with the in-memory registry
    (``MemoryRegistry``, as tests/unit/test_serving.py drives it; Ray Serve's
    replica context is stubbed because there is no Serve here), ``--swap-repeats``
    promotions of each kind, cycling full 1, LoRA 1, full 2, LoRA 2. A swap is timed
    from ``registry.set(record)`` until the replica reports the new manifest sha256
    to the registry (what ``Server.swap`` waits for): the registry's long poll
    waking the replica's watcher thread, ``Models.load``, the reference swap, the
    report. The replica also records its own load time (``loaded_in_s``).

Checkpoint bytes: the model's files (``model.safetensors``; ``adapter.safetensors``
+ ``base.json``) and the whole learner checkpoint (with ``optimizer.pt`` and
``learner.json``), from the manifests.

Torch runs with ``--threads`` (1, a replica's default ``serve.torch_threads``).
The machine is shared: other processes' CPU use during each phase is reported
(bench/procstat.py).

Command (from the repository root)::

    .venv/bin/python bench/swap.py --out docs/bench

writes docs/bench/swap.md, .json and .png. ``--quick``: a tiny model only (2 x 64),
3 loads and 2 swaps of each kind (a smoke run; not the reference numbers).
"""

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import NO_PLOT, command_line, machine_info, pyplot, report, save_figure  # noqa: E402 (bench/ is not a package)
from procstat import cpu_delta, cpu_snapshot  # noqa: E402

MODELS: dict[str, dict[str, int]] = {
    "default": {},  # ModelConfig(): 4 x 256
    "large": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2048},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128},
}
KINDS = ("full", "lora")
APP = "everlearn-swap-bench"


def stats(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"n": len(xs), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min()),
            "max": float(a.max()), "mean": float(a.mean())}


def commit_checkpoints(model_cfg, root: Path, n: int, seq: int) -> tuple[Any, list[Any]]:
    """A learner of ``model_cfg`` takes ``n`` steps and commits a checkpoint after each: (store, refs)."""
    from everlearn.learners import Learner, ScheduleConfig, TrainConfig

    learner = Learner(model_cfg, TrainConfig(seq_len=seq, batch_size=2, torch_threads=2),
                      ScheduleConfig(warmup_steps=1, cooldown_steps=1, peak_lr=1e-2, constant_lr=1e-2, min_lr=1e-3), str(root))
    tokens = np.random.default_rng(0).integers(3, 259, size=(2, seq)).astype(np.int32)
    refs = []
    for _ in range(n):
        learner.train_step(tokens)
        refs.append(learner.store.commit(learner.step, learner.save(learner.step)))
    return learner.store, refs


def file_bytes(store, ref) -> dict[str, int]:
    return {name: int(e["size"]) for name, e in store.manifest(ref)["files"].items()}


def own_bytes(model, base) -> int:
    """Bytes of the tensors ``model`` holds that are not ``base``'s (shared tensors cost nothing per version)."""
    shared = {t.untyped_storage().data_ptr() for t in [*base.parameters(), *base.buffers()]}
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr in shared or ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


@contextlib.contextmanager
def serve_context_stub():
    """``serve.batch`` asks Ray Serve for the replica's context; outside Serve give it one (as the serving unit tests do)."""
    from types import SimpleNamespace

    from ray import serve

    original = serve.get_replica_context
    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="swap-bench"),
                              _deployment_config=SimpleNamespace(max_ongoing_requests=64))
    serve.get_replica_context = lambda: context
    try:
        yield
    finally:
        serve.get_replica_context = original


def replica_swaps(model_cfg, records: dict[str, list[dict[str, Any]]], repeats: int, threads: int) -> dict[str, Any]:
    """Promotions through the in-memory registry into a real ``LanguageModelServer``: seconds until it reports each."""
    from everlearn.deploy.registry import MemoryRegistry, holds
    from everlearn.deploy.serving import LanguageModelServer

    registry = MemoryRegistry({"version": 0, **records["full"][0]})
    with serve_context_stub():
        t0 = time.perf_counter()
        server = LanguageModelServer({"model": model_cfg.model_dump(), "app_name": APP, "torch_threads": threads},
                                     registry=registry, wait_s=0)
        start = time.perf_counter() - t0
        swaps: list[dict[str, Any]] = []
        try:
            cycle = [(k, i) for i in range(2) for k in KINDS]  # full 1, LoRA 1, full 2, LoRA 2
            cycle = cycle[1:] + cycle[:1]  # the replica starts on full 1
            for n in range(repeats * len(KINDS)):
                kind, i = cycle[n % len(cycle)]
                version = n + 1
                record = {"version": version, **records[kind][i], "promoted_unix": time.time()}
                sha = record["manifest_sha256"]
                gc.collect()
                t = time.perf_counter()
                with registry.changed:
                    registry.state.set(record)
                    registry.changed.notify_all()
                    ok = registry.changed.wait_for(lambda: any(holds(r, version, sha) for r in registry.state.live()), 120)  # noqa: B023
                seconds = time.perf_counter() - t
                if not ok or server.loaded.info.get("manifest_sha256") != sha:
                    raise RuntimeError(f"the replica did not report version {version} ({kind}) within 120 s: {server.load_error}")
                swaps.append({"kind": kind, "checkpoint": i, "version": version, "seconds": seconds,
                              "loaded_in_s": server.loaded.info["loaded_in_s"]})
        finally:
            server.close()
    out: dict[str, Any] = {"replica_start_s": start, "swaps": swaps}
    for kind in KINDS:
        mine = [s for s in swaps if s["kind"] == kind]
        out[kind] = {"swap_s": stats([s["seconds"] for s in mine]), "loaded_in_s": stats([s["loaded_in_s"] for s in mine])}
    return out


def bench_model(name: str, overrides: dict[str, int], a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import torch

    from everlearn.learners import CheckpointRef, ModelConfig, Models, build_tokenizer

    full_cfg = ModelConfig(**overrides)
    lora_cfg = ModelConfig(**overrides, lora={"r": a.lora_r})
    print(f"[{name}] committing checkpoints ...", end=" ", flush=True)
    t0 = time.perf_counter()
    stores, refs = {}, {}
    for kind, cfg in (("full", full_cfg), ("lora", lora_cfg)):
        torch.set_num_threads(2)
        stores[kind], refs[kind] = commit_checkpoints(cfg, tmp / name / kind, 2, a.seq)
        gc.collect()
    print(f"{time.perf_counter() - t0:.1f} s", flush=True)
    torch.set_num_threads(a.threads)
    tokenizer = build_tokenizer(full_cfg)
    res: dict[str, Any] = {"model": full_cfg.model_dump(), "lora": lora_cfg.lora.model_dump(mode="json")}

    # the base, once
    cpu0 = cpu_snapshot()
    models = Models(full_cfg, tokenizer)
    t0 = time.perf_counter()
    base = models.base
    t1 = time.perf_counter()
    identity = models.identity
    t2 = time.perf_counter()
    res["parameters"] = sum(p.numel() for p in base.parameters())
    res["base"] = {"build_s": t1 - t0, "digest_s": t2 - t1, "sha256": identity["sha256"],
                   "bytes": sum(t.untyped_storage().nbytes() for t in base.state_dict().values())}
    print(f"[{name}] {res['parameters'] / 1e6:.1f}M parameters; base: build {t1 - t0:.2f} s, sha256 {t2 - t1:.2f} s", flush=True)

    # bytes on disk
    res["bytes"] = {}
    for kind in KINDS:
        files = file_bytes(stores[kind], refs[kind][0])
        model_files = {k: v for k, v in files.items() if k in ("model.safetensors", "adapter.safetensors", "base.json")}
        res["bytes"][kind] = {"model_files": sum(model_files.values()), "files": model_files,
                              "checkpoint": sum(files.values()), "all_files": files}

    # Models.load: the first of each kind apart, then interleaved repeats
    first = {}
    for kind in KINDS:
        t = time.perf_counter()
        m = models.load(stores[kind], refs[kind][0])
        first[kind] = time.perf_counter() - t
        del m
    lora_model = models.load(stores["lora"], refs["lora"][0])
    lora_trainable = sum(p.numel() for n, p in lora_model.named_parameters() if "lora_" in n)
    del lora_model
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    own: dict[str, int] = {}
    for n in range(a.repeats):
        for kind in (KINDS if n % 2 == 0 else KINDS[::-1]):
            ref = CheckpointRef.from_dict(refs[kind][n % 2].to_dict())
            gc.collect()
            t = time.perf_counter()
            m = models.load(stores[kind], ref)
            times[kind].append(time.perf_counter() - t)
            own[kind] = own_bytes(m, base)
            del m
    res["load"] = {kind: {"first_s": first[kind], **stats(times[kind]), "seconds": times[kind], "own_bytes": own[kind]} for kind in KINDS}
    res["lora_parameters"] = lora_trainable
    res["load_ratio_full_over_lora"] = res["load"]["full"]["median"] / res["load"]["lora"]["median"]
    print(f"[{name}] Models.load median: full {res['load']['full']['median'] * 1e3:.1f} ms, "
          f"LoRA {res['load']['lora']['median'] * 1e3:.1f} ms", flush=True)
    del models, base
    gc.collect()

    # the end-to-end swap in a replica
    if a.swap_repeats:
        records = {kind: [r.to_dict() for r in refs[kind]] for kind in KINDS}
        res["replica"] = replica_swaps(full_cfg, records, a.swap_repeats, a.threads)
        print(f"[{name}] replica swap median: full {res['replica']['full']['swap_s']['median'] * 1e3:.1f} ms, "
              f"LoRA {res['replica']['lora']['swap_s']['median'] * 1e3:.1f} ms", flush=True)
    res["cpu_seconds"] = cpu_delta(cpu0, cpu_snapshot())
    res["seconds"] = time.perf_counter() - t0
    res["outside_cores"] = res["cpu_seconds"]["outside this benchmark"] / res["seconds"]
    gc.collect()
    return res


# -- report --------------------------------------------------------------------
def mib(b: float) -> str:
    return f"{b / 2**20:,.2f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"


def ms(x: float) -> str:
    return f"{1e3 * x:,.1f}"


def render(res: dict[str, Any]) -> str:
    out = [f"LoRA r = {res['lora_r']} (alpha 16, q_proj and v_proj); torch threads {res['threads']}. "
           f"Times in ms: median / p90 over the repeats (the first load of each kind excluded, shown apart).",
           "",
           "| model | checkpoint | model files | whole checkpoint | `Models.load` median / p90 | first load | "
           "new tensor bytes per loaded version | replica swap median / p90 | replica's own load median |",
           "|:---|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["models"].items():
        desc = f"{name}: {r['model']['num_layers']} x {r['model']['hidden_size']}, {r['parameters'] / 1e6:.1f}M"
        for kind in KINDS:
            ld, b = r["load"][kind], r["bytes"][kind]
            rep = r.get("replica", {}).get(kind)
            swap = f"{ms(rep['swap_s']['median'])} / {ms(rep['swap_s']['p90'])} (n = {rep['swap_s']['n']})" if rep else "-"
            own = f"{ms(rep['loaded_in_s']['median'])}" if rep else "-"
            what = "full weights" if kind == "full" else f"LoRA ({r['lora_parameters']:,} adapter parameters)"
            out.append(f"| {desc} | {what} | {mib(b['model_files'])} | {mib(b['checkpoint'])} | "
                       f"{ms(ld['median'])} / {ms(ld['p90'])} (n = {ld['n']}) | {ms(ld['first_s'])} | {mib(ld['own_bytes'])} | {swap} | {own} |")
    out += ["", "Once per base, not per swap (a replica or evaluator pays it when it starts):", "",
            "| model | build the base from config | sha256 of its weights (checked against each adapter's base.json) | "
            "full / LoRA `Models.load` (medians) | full / LoRA replica swap (medians) | other processes, cores |",
            "|:---|---:|---:|---:|---:|---:|"]
    for name, r in res["models"].items():
        rep = r.get("replica")
        ratio = f"{rep['full']['swap_s']['median'] / rep['lora']['swap_s']['median']:.1f}x" if rep else "-"
        out.append(f"| {name} | {ms(r['base']['build_s'])} ms | {ms(r['base']['digest_s'])} ms | "
                   f"{r['load_ratio_full_over_lora']:.1f}x | {ratio} | {r['outside_cores']:.2f} |")
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    names = list(res["models"])
    panels = [("load", "Models.load(store, ref)", lambda r, k: r["load"][k]["seconds"])]
    if all("replica" in r for r in res["models"].values()):
        panels.append(("replica", "replica swap (registry set -> replica reports)",
                       lambda r, k: [s["seconds"] for s in r["replica"]["swaps"] if s["kind"] == k]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    width = 0.38
    for ax, (_, title, get) in zip(axes[0], panels, strict=True):
        for j, kind in enumerate(KINDS):
            xs = np.arange(len(names)) + (j - 0.5) * width
            med = [1e3 * statistics.median(get(res["models"][n], kind)) for n in names]
            p90 = [1e3 * float(np.percentile(get(res["models"][n], kind), 90)) for n in names]
            ax.bar(xs, med, width, color=["C3", "C0"][j], label=f"{'full weights' if kind == 'full' else 'LoRA adapter'} (median)")
            ax.scatter(xs, p90, marker="_", s=300, color="black", zorder=3, label="p90" if j == 0 else None)
            for x, v in zip(xs, med, strict=True):
                ax.text(x, v * 1.08, f"{v:,.0f}" if v >= 10 else f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1)
        ax.set_xticks(range(len(names)), [f"{n}\n{res['models'][n]['parameters'] / 1e6:.1f}M params" for n in names])
        ax.set_ylabel("ms (log scale)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(True, axis="y", alpha=0.3)
    return save_figure(plt, fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for swap.md / .json / .png (default: print only)")
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny model, 3 loads and 2 swaps of each kind")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=None, help="default: default large (--quick: tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed Models.load calls per kind (default 20; --quick 3)")
    ap.add_argument("--swap-repeats", type=int, default=None, help="replica swaps per kind (default 10; --quick 2; 0: none)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads while loading (a replica's serve.torch_threads)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per row of the learners' two training steps")
    ap.add_argument("--name", default="swap", help="the output files' name: NAME.md, .json, .png")
    a = ap.parse_args(argv)
    q = a.quick
    a.models = a.models or (["tiny"] if q else ["default", "large"])
    a.repeats = a.repeats or (3 if q else 20)
    a.swap_repeats = (2 if q else 10) if a.swap_repeats is None else a.swap_repeats
    import torch

    t_start = time.perf_counter()
    info = machine_info(torch=torch.__version__)
    print(f"machine: {info['nproc']} cpus, load average {info['loadavg_at_start'][0]:.2f}" + ("  [--quick]" if q else ""), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="everlearn-swap-"))
    try:
        models = {name: bench_model(name, MODELS[name], a, tmp) for name in a.models}
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    res: dict[str, Any] = {"command": command_line(), "quick": q, "machine": info, "date": time.strftime("%Y-%m-%d"),
                           "lora_r": a.lora_r, "threads": a.threads, "repeats": a.repeats, "swap_repeats": a.swap_repeats,
                           "models": models}
    report(res, a.out, a.name, title="Swapping the served model: LoRA adapter vs full weights",
           intro="The same base model either way; a LoRA version shares the base's tensors.",
           versions={"torch": "torch"}, setting=f"Run on {res['date']}. ", render=render, plot=plot,
           image_alt="Models.load and replica swap, full weights vs LoRA adapter, median and p90",
           raw_note=" (every load and swap)", t_start=t_start, script="swap")
    return res


if __name__ == "__main__":
    main()
