"""Benchmark of the replay reservoirs (``everlearn.buffers``): uniform, weighted, stratified.

It measures and reports; it never asserts a timing (the targets are shown next
to the numbers, marked met or missed).

What is measured
----------------
1. Per-item insert cost, Li's Algorithm L (``UniformReservoir.add_many``)
   against a naive Algorithm R written here with the same storage style (a
   preallocated int32 ``(k, seq_len)`` array, a Python loop over the items,
   ``j = rng.integers(0, t + 1)`` for every item past the first k, the row
   copied when ``j < k``). k = 1000, seq_len = 64, N/k in {10, 100, 1000}
   (N up to 1e6). The stream is fed in batches of 256 sequences taken, in
   turn, from a pool of 4096 random sequences built once, so building items is
   not timed. Cost = wall time of the whole stream (from an empty reservoir,
   fill phase included) / N; median of 3 repeats.
   DESIGN target: speed-up R/L >= 10x at N/k >= 100.
   The same streams into every buffer kind, with three domains passed as the
   daemon passes them (weighted: domain weights 2/1/1; stratified: equal
   quotas), to show what each kind costs per item.
2. Resident memory over 1M inserts at fixed capacity (k = 2048,
   seq_len = 256), for each kind: VmRSS from /proc/self/status every 50k
   inserts after a warm-up of 100k. Growth = (max - start) / start.
   Target: < 5 %.
3. Latency of drawing a training batch, ``sample_with_lengths(n)`` for
   n in {2, 8, 64} from a full buffer (k = 2048, seq_len = 256): median and
   p99 over 2000 calls, in microseconds.

Command (from the repository root)::

    .venv/bin/python bench/reservoir.py --out docs/bench

writes docs/bench/reservoir.md (tables, the command, the machine),
docs/bench/reservoir.json (every raw number) and, when matplotlib is
importable, docs/bench/reservoir.png. ``--quick`` is a smoke run with smaller
streams (a few seconds); its numbers are not the reference ones.
"""

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import NO_PLOT, command_line, machine_info, pyplot, report  # noqa: E402  (bench/ is not a package)

from everlearn.buffers import StratifiedReservoir, UniformReservoir, WeightedReservoir

BATCH = 256  # items per add_many call
POOL = 4096  # distinct pre-built sequences, cycled through
DOMAINS = [("a", "b", "c")[i % 3] for i in range(BATCH)]  # the domains of every batch's items
KINDS: dict[str, Callable[[int, int, int], Any]] = {
    "uniform": lambda k, seq_len, seed: UniformReservoir(k, seq_len, seed),
    "weighted": lambda k, seq_len, seed: WeightedReservoir(k, seq_len, seed, domain_weights={"a": 2.0}),
    "stratified": lambda k, seq_len, seed: StratifiedReservoir(k, seq_len, seed),
}
SPEEDUP_TARGET = 10.0  # R / L at N/k >= 100
RSS_GROWTH_TARGET_PCT = 5.0


class NaiveReservoirR:
    """Vitter's Algorithm R: one random draw per item past the first k.

    Same storage as ``SequenceSlots`` (preallocated padded int32 rows and a
    length per row) so that only the admission rule differs from Algorithm L.
    """

    def __init__(self, capacity: int, seq_len: int, seed: int = 0):
        self.capacity = capacity
        self.tokens = np.zeros((capacity, seq_len), dtype=np.int32)
        self.lengths = np.zeros(capacity, dtype=np.int32)
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._seen = 0

    def _put(self, slot: int, seq: np.ndarray) -> None:
        n = len(seq)
        self.tokens[slot, :n] = seq
        self.tokens[slot, n:] = 0
        self.lengths[slot] = n

    def add_many(self, items: Sequence[np.ndarray]) -> None:
        k, rng = self.capacity, self._rng
        t = self._seen
        for seq in items:
            if t < k:
                self._put(t, seq)
            else:
                j = rng.integers(0, t + 1)
                if j < k:
                    self._put(j, seq)
            t += 1
        self._seen = t

    @property
    def seen(self) -> int:
        return self._seen

    def __len__(self) -> int:
        return min(self._seen, self.capacity)


# -- helpers -----------------------------------------------------------------
def make_batches(seq_len: int, seed: int) -> list[list[np.ndarray]]:
    """POOL random int32 sequences of length 1..seq_len, cut into batches of BATCH."""
    rng = np.random.default_rng(seed)
    pool = [
        rng.integers(1, 50_000, size=int(rng.integers(1, seq_len + 1)), dtype=np.int32)
        for _ in range(POOL)
    ]
    return [pool[i : i + BATCH] for i in range(0, POOL, BATCH)]


def feed(buf: Any, batches: list[list[np.ndarray]], n_items: int, domains: bool = False) -> None:
    """Offer ``n_items`` items (cycling the batches); the last batch may be partial."""
    nb = len(batches)
    full, rest = divmod(n_items, BATCH)
    for b in range(full):
        if domains:
            buf.add_many(batches[b % nb], DOMAINS)
        else:
            buf.add_many(batches[b % nb])
    if rest:
        if domains:
            buf.add_many(batches[full % nb][:rest], DOMAINS[:rest])
        else:
            buf.add_many(batches[full % nb][:rest])


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def timed(fn: Callable[[], None]) -> float:
    gc.collect()
    t0 = time.perf_counter_ns()
    fn()
    return float(time.perf_counter_ns() - t0)


# -- 1. insert cost ----------------------------------------------------------
def bench_insert(k: int, seq_len: int, ratios: list[int], repeats: int, r_repeats_big: int,
                 seed: int) -> list[dict[str, Any]]:
    batches = make_batches(seq_len, seed)
    feed(UniformReservoir(k, seq_len, seed), batches, 4 * k)  # warm up code paths
    feed(NaiveReservoirR(k, seq_len, seed), batches, 4 * k)
    rows = []
    for ratio in ratios:
        n = ratio * k
        row: dict[str, Any] = {"k": k, "seq_len": seq_len, "N_over_k": ratio, "N": n}
        for name, cls in (("L", UniformReservoir), ("R", NaiveReservoirR)):
            reps = r_repeats_big if (name == "R" and n >= 1_000_000) else repeats
            runs_ns = []
            for rep in range(reps):
                buf = cls(k, seq_len, seed + rep)
                runs_ns.append(timed(lambda buf=buf, n=n: feed(buf, batches, n)))
                if buf.seen != n or len(buf) != k:  # sanity, not timing
                    raise RuntimeError(f"{name}: seen={buf.seen} len={len(buf)}, expected {n}, {k}")
            row[name] = {"ns_per_item_runs": [t / n for t in runs_ns],
                         "ns_per_item": statistics.median(runs_ns) / n, "repeats": reps}
        row["speedup"] = row["R"]["ns_per_item"] / row["L"]["ns_per_item"]
        rows.append(row)
        print(f"  N/k={ratio:>5}: L {row['L']['ns_per_item']:9.1f} ns/item, "
              f"R {row['R']['ns_per_item']:9.1f} ns/item, x{row['speedup']:.1f}", flush=True)
    return rows


def bench_kinds(k: int, seq_len: int, ratios: list[int], repeats: int, seed: int) -> list[dict[str, Any]]:
    """ns per item of every buffer kind, domains passed; median of ``repeats`` streams from empty."""
    batches = make_batches(seq_len, seed)
    rows = []
    for kind, make in KINDS.items():
        feed(make(k, seq_len, seed), batches, 4 * k, domains=True)  # warm up code paths
        for ratio in ratios:
            n = ratio * k
            runs_ns = []
            for rep in range(repeats):
                buf = make(k, seq_len, seed + rep)
                runs_ns.append(timed(lambda buf=buf, n=n: feed(buf, batches, n, domains=True)))
                if buf.seen != n or len(buf) != k:
                    raise RuntimeError(f"{kind}: seen={buf.seen} len={len(buf)}, expected {n}, {k}")
            row = {"kind": kind, "k": k, "N_over_k": ratio, "N": n, "repeats": repeats,
                   "ns_per_item": statistics.median(runs_ns) / n, "ns_per_item_runs": [t / n for t in runs_ns]}
            rows.append(row)
            print(f"  {kind:>10} N/k={ratio:>5}: {row['ns_per_item']:9.1f} ns/item", flush=True)
    return rows


# -- 2. RSS at fixed capacity --------------------------------------------------
def bench_rss(kind: str, k: int, seq_len: int, total: int, warmup: int, every: int, seed: int) -> dict[str, Any]:
    batches = make_batches(seq_len, seed)
    gc.collect()
    rss_before = rss_kib()
    buf = KINDS[kind](k, seq_len, seed)
    nb, done, next_mark = len(batches), 0, warmup
    samples: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    while done < total:
        batch = batches[(done // BATCH) % nb][: total - done]
        buf.add_many(batch, DOMAINS[: len(batch)])
        done += len(batch)
        if done >= next_mark:
            samples.append((done, rss_kib()))
            next_mark += every
    elapsed = time.perf_counter() - t0
    rss = [r for _, r in samples]
    start, end, peak = rss[0], rss[-1], max(rss)
    return {
        "kind": kind, "k": k, "seq_len": seq_len, "inserts": total, "warmup": warmup, "every": every,
        "buffer_bytes": buf.slots.nbytes, "rss_before_buffer_kib": rss_before,
        "samples": [{"inserts": i, "rss_kib": r} for i, r in samples],
        "start_kib": start, "end_kib": end, "max_kib": peak,
        "growth_pct": 100.0 * (peak - start) / start,
        "end_growth_pct": 100.0 * (end - start) / start,
        "seconds": elapsed,
    }


# -- 3. sampling latency -----------------------------------------------------
def bench_sample(k: int, seq_len: int, ns: list[int], calls: int, seed: int) -> list[dict[str, Any]]:
    buf = UniformReservoir(k, seq_len, seed)
    feed(buf, make_batches(seq_len, seed), 4 * k)
    assert len(buf) == k
    rows = []
    for n in ns:
        for _ in range(100):  # warm-up
            buf.sample_with_lengths(n)
        lat = np.empty(calls, dtype=np.float64)
        clock = time.perf_counter_ns
        for i in range(calls):
            t0 = clock()
            buf.sample_with_lengths(n)
            lat[i] = clock() - t0
        us = lat / 1e3
        rows.append({"n": n, "calls": calls, "median_us": float(np.median(us)),
                     "p99_us": float(np.percentile(us, 99)), "min_us": float(us.min()),
                     "max_us": float(us.max())})
    return rows


# -- report ------------------------------------------------------------------
def render(res: dict[str, Any]) -> str:
    out = []
    ins = res["insert"]
    r_note = ""
    if any(r["R"]["repeats"] < r["L"]["repeats"] for r in ins):
        r_note = " (R at N = 1e6 measured once, see `--r-repeats-big`)"
    out += [f"### 1. Per-item insert cost, k = {ins[0]['k']}, seq_len = {ins[0]['seq_len']}",
            "",
            f"Median of {ins[0]['L']['repeats']} runs{r_note}; batches of {BATCH}; "
            f"target: R/L >= {SPEEDUP_TARGET:g}x at N/k >= 100.",
            "",
            "| N/k | N | Algorithm L (ns/item) | naive R (ns/item) | speed-up R/L | target |",
            "|---:|---:|---:|---:|---:|:---|"]
    for r in ins:
        tgt = "-" if r["N_over_k"] < 100 else ("met" if r["speedup"] >= SPEEDUP_TARGET else "MISSED")
        out.append(f"| {r['N_over_k']} | {r['N']:,} | {r['L']['ns_per_item']:.1f} | "
                   f"{r['R']['ns_per_item']:.1f} | {r['speedup']:.1f}x | {tgt} |")
    kinds = res["kinds"]
    ratios = sorted({r["N_over_k"] for r in kinds})
    by = {(r["kind"], r["N_over_k"]): r["ns_per_item"] for r in kinds}
    out += ["",
            f"Every kind, three domains passed with each batch (weighted 2/1/1, stratified equal quotas), "
            f"median of {kinds[0]['repeats']} runs, ns per item:",
            "",
            "| kind | " + " | ".join(f"N/k = {r}" for r in ratios) + " |",
            "|:---|" + "---:|" * len(ratios)]
    for kind in KINDS:
        out.append(f"| {kind} | " + " | ".join(f"{by[(kind, r)]:.1f}" for r in ratios) + " |")
    rss = res["rss"]
    m0 = rss[0]
    out += ["",
            f"### 2. RSS over {m0['inserts']:,} inserts, k = {m0['k']}, seq_len = {m0['seq_len']}",
            "",
            f"VmRSS every {m0['every']:,} inserts after a {m0['warmup']:,}-insert warm-up; "
            f"buffer arrays {m0['buffer_bytes'] / 2**20:.2f} MiB; growth = (max - start) / start, "
            f"target < {RSS_GROWTH_TARGET_PCT:g} %.",
            "",
            "| kind | start (MiB) | end (MiB) | max (MiB) | growth | end vs start | target |",
            "|:---|---:|---:|---:|---:|---:|:---|"]
    for m in rss:
        tgt = "met" if m["growth_pct"] < RSS_GROWTH_TARGET_PCT else "MISSED"
        out.append(f"| {m['kind']} | {m['start_kib'] / 1024:.1f} | {m['end_kib'] / 1024:.1f} | {m['max_kib'] / 1024:.1f} | "
                   f"{m['growth_pct']:+.2f} % | {m['end_growth_pct']:+.2f} % | {tgt} |")
    s = res["sample"]
    out += ["",
            f"### 3. `sample_with_lengths(n)` from a full buffer, k = {res['sample_k']}, "
            f"seq_len = {res['sample_seq_len']}",
            "",
            f"{s[0]['calls']} calls per n.",
            "",
            "| n | median (us) | p99 (us) | min (us) | max (us) |",
            "|---:|---:|---:|---:|---:|"]
    for r in s:
        out.append(f"| {r['n']} | {r['median_us']:.2f} | {r['p99_us']:.2f} | "
                   f"{r['min_us']:.2f} | {r['max_us']:.2f} |")
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    ins, kinds = res["insert"], res["kinds"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ratios = [r["N_over_k"] for r in ins]
    ax1.loglog(ratios, [r["R"]["ns_per_item"] for r in ins], "s--", color="grey", label="naive Algorithm R")
    ax1.loglog(ratios, [r["L"]["ns_per_item"] for r in ins], "o-", label="uniform: Algorithm L")
    for kind, marker in (("weighted", "^-"), ("stratified", "v-")):
        rows = [r for r in kinds if r["kind"] == kind]
        ax1.loglog([r["N_over_k"] for r in rows], [r["ns_per_item"] for r in rows], marker, label=f"{kind} (3 domains)")
    ax1.set_xlabel("N / k (stream length over capacity)")
    ax1.set_ylabel("ns per offered item")
    ax1.set_title(f"Insert cost, k = {ins[0]['k']}, seq_len = {ins[0]['seq_len']}")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    top = 0.0
    for m in res["rss"]:
        xs = [p["inserts"] for p in m["samples"]]
        ys = [p["rss_kib"] / 1024 for p in m["samples"]]
        ax2.plot(xs, ys, "o-", markersize=3, label=m["kind"])
        top = max(top, *ys)
    ax2.set_xlabel("inserts")
    ax2.set_ylabel("VmRSS of the process (MiB)")
    ax2.set_ylim(0, top * 1.2)
    ax2.set_title(f"Memory after warm-up, k = {res['rss'][0]['k']}, seq_len = {res['rss'][0]['seq_len']}")
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for reservoir.md / .json / .png (default: print only)")
    ap.add_argument("--quick", action="store_true", help="smoke run with small streams (seconds)")
    ap.add_argument("--r-repeats-big", type=int, default=3,
                    help="repeats of naive R at N = 1e6 (1 if it is too slow)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    if args.quick:
        ratios, repeats, rss_total, rss_warmup, rss_every, calls = [10, 100], 3, 200_000, 50_000, 25_000, 300
    else:
        ratios, repeats, rss_total, rss_warmup, rss_every, calls = [10, 100, 1000], 3, 1_000_000, 100_000, 50_000, 2000
    info = machine_info(numpy=np.__version__)
    print(f"machine: {info['nproc']} cpus ({info['cpu']}), python {info['python']}, numpy {info['numpy']}"
          + ("  [--quick]" if args.quick else ""), flush=True)

    print("1. insert cost", flush=True)
    insert = bench_insert(1000, 64, ratios, repeats, min(args.r_repeats_big, repeats), args.seed)
    kinds = bench_kinds(1000, 64, ratios, repeats, args.seed)
    print("2. RSS", flush=True)
    rss = [bench_rss(kind, 2048, 256, rss_total, rss_warmup, rss_every, args.seed) for kind in KINDS]
    print("3. sampling latency", flush=True)
    sample = bench_sample(2048, 256, [2, 8, 64], calls, args.seed)

    res: dict[str, Any] = {
        "command": command_line(), "quick": args.quick, "machine": info,
        "batch": BATCH, "pool": POOL, "insert": insert, "kinds": kinds, "rss": rss, "sample": sample,
        "sample_k": 2048, "sample_seq_len": 256,
        "targets": {"speedup_at_N_over_k_ge_100": SPEEDUP_TARGET, "rss_growth_pct_lt": RSS_GROWTH_TARGET_PCT},
    }
    report(res, args.out, "reservoir", title="Replay reservoir benchmark", intro="", versions={"NumPy": "numpy"},
           setting="", render=render, plot=plot, image_alt="insert cost and RSS", raw_note="", t_start=t_start)


if __name__ == "__main__":
    main()
