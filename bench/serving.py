"""Benchmark of serving: /score through HTTP against scoring in-process, and hot swaps under load.

It measures and reports; it never asserts a timing (the targets are shown next
to the numbers, marked met or missed).

What is measured
----------------
The model of the embedded default (``ModelConfig()``: a 4 x 256 Llama, context
1,024), with the weights of checkpoints a ``Learner`` committed (three versions,
a training step apart). Documents: ``--doc-bytes`` (1,500) bytes of real text
(manual pages, then Python sources: ``everlearn.daemon.demo``), ~1,500 byte-level
tokens each: two chunks of the context.

``inprocess`` (the reference)
    This process scores one document at a time with
    ``torch.set_num_threads(serve.torch_threads)`` (1), two ways: as a replica
    scores a batch of one (``deploy/scoring.py``: its chunks in one forward, padded
    to the longest), and one forward per chunk (no padding). Documents/s over
    ``--seconds`` (15); the faster way is the reference.
``http_*``
    The real ``Server`` (deploy/deployment.py) on a local Ray, one replica with
    the same torch threads, and ``--clients`` (20) client threads in this process,
    each posting ``POST /score`` on a kept-alive connection as soon as its last
    answer came. Requests/s over ``--seconds`` after ``--warmup`` (5) seconds,
    latency p50/p99, and the cores each process used meanwhile (psutil).
    ``http_batched``: the defaults (``serve.max_batch_size`` 16, 5 ms wait,
    ``max_ongoing_requests`` 64). ``http_unbatched``: ``max_batch_size`` 1, one
    text per forward. ``http_serve_default_ongoing``: ``max_ongoing_requests`` 5,
    Serve's default, which caps a batch at 5 requests.
    Each variant runs ``--rounds`` (3) rounds on one deployment: the in-process
    reference both ways (clients stopped, the replica idle), then the HTTP
    window. A round's ratio is to its own reference, so slow drifts of the
    machine cancel; reported: median [min - max] over the rounds.
``swaps``
    ``--swap-replicas`` (2) replicas, the same clients posting /score, and
    ``--swaps`` (12) promotions through ``Server.swap`` cycling the three
    versions every ``--swap-gap-s`` (2) s. Swap latency: from the call until every
    live replica reported the new manifest sha256 (what ``Server.swap`` waits
    for). Request latency p99 of the requests that ended in the ``--seconds``
    before the first swap (steady) against the requests in flight while a swap
    ran; failed requests (any answer but 200, or none) over the whole phase.

Ray starts its workers at niceness 15; here it starts them at this process's
niceness (``RAY_worker_niceness``), so the replica and the in-process reference
compete for the cores on equal terms with this process's clients and Ray's own
processes.

The machine is shared: each window first waits until other processes use
fewer than ``--quiet-below`` (0.15) cores, and is measured again (``--retries``,
2) when they used more than ``--max-outside`` (0.25) during it; the cores they
used are reported with every window (bench/procstat.py).

DESIGN targets: ``http_batched`` >= 1.0 x ``inprocess`` documents/s; request
p99 during swaps <= 2 x steady; no failed request.

Command (from the repository root)::

    .venv/bin/python bench/serving.py --out docs/bench

writes docs/bench/serving.md, .json and .png (``--name`` another name). ``--quick``: a tiny model, 300-byte
documents, 4 clients, 3 s windows, 3 swaps, one HTTP variant (a smoke run; not
the reference numbers).
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import NO_PLOT, command_line, machine_info, pyplot, report, save_figure  # noqa: E402 (bench/ is not a package)
from procstat import cpu_delta, cpu_snapshot, wait_quiet  # noqa: E402

RATIO_TARGET, SWAP_P99_TARGET = 1.0, 2.0
VARIANTS = {"http_batched": {}, "http_unbatched": {"max_batch_size": 1}, "http_serve_default_ongoing": {"max_ongoing_requests": 5}}
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128}


def checkpoints(model_cfg, root: Path, n: int) -> list[dict[str, Any]]:
    """``n`` committed checkpoints of a learner, a training step apart, as promoted records."""
    from everlearn.learners import Learner, ScheduleConfig, TrainConfig

    learner = Learner(model_cfg, TrainConfig(seq_len=64, batch_size=2, torch_threads=1), ScheduleConfig(), str(root))
    tokens = np.random.default_rng(0).integers(3, 259, size=(2, 64)).astype(np.int32)
    refs = [learner.store.commit(0, learner.save(0))]
    for _ in range(n - 1):
        learner.train_step(tokens)
        refs.append(learner.store.commit(learner.step, learner.save(learner.step)))
    return [{"version": v, **r.to_dict(), "promoted_unix": time.time()} for v, r in enumerate(refs)]


def documents(n: int, doc_bytes: int) -> list[str]:
    from everlearn.daemon import demo

    text = "".join(t for _, t in demo.take(demo.man_pages(), n * doc_bytes // 2))
    text += "".join(t for _, t in demo.take(demo.python_sources(), n * doc_bytes - len(text)))
    return [text[i * doc_bytes : (i + 1) * doc_bytes] for i in range(n)]


def quiet_window(a: argparse.Namespace, what: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()`` once other processes use fewer than ``--quiet-below`` cores; again (``--retries``) when they used
    more than ``--max-outside`` meanwhile. The result says the cores others used (``outside_cores``)."""
    for attempt in range(a.retries + 1):
        waited, _ = wait_quiet(a.quiet_below, a.quiet_timeout) if a.quiet_below > 0 else (0.0, None)
        c0, t0 = cpu_snapshot(), time.perf_counter()
        r = measure()
        outside = cpu_delta(c0, cpu_snapshot())["outside this benchmark"] / (time.perf_counter() - t0)
        r.update(waited_for_quiet_s=waited, outside_cores=outside, attempt=attempt, disturbed=outside > a.max_outside)
        if not r["disturbed"]:
            break
        print(f"  {what}: other processes used {outside:.2f} > {a.max_outside:g} cores" + (": measuring again" if attempt < a.retries else ""), flush=True)
    return r


class InProcess:
    """The reference: this process scores one document at a time, as a replica scores a batch of one (its chunks in
    one forward, padded to the longest), or ``per_chunk``, one forward per chunk (no padding at all)."""

    def __init__(self, model_cfg, record: dict[str, Any], docs: list[str], threads: int):
        from everlearn.learners import (
            CheckpointRef,
            CheckpointStore,
            Models,
            build_tokenizer,
        )

        self.tok, self.docs, self.threads = build_tokenizer(model_cfg), docs, threads
        ref = CheckpointRef.from_dict(record)
        self.model = Models(model_cfg, self.tok).load(CheckpointStore(ref.store_url), ref)

    def one(self, text: str, per_chunk: bool) -> None:
        from everlearn.deploy.scoring import chunks, score_rows

        rows = chunks(self.tok.encode(text), self.model.config.max_position_embeddings)
        for group in ([[r] for r in rows] if per_chunk else [rows]):
            score_rows(self.model, [group], self.tok.pad_id)

    def rate(self, a: argparse.Namespace, per_chunk: bool) -> dict[str, Any]:
        """Documents/s over a window of ``--seconds`` (a quiet one: ``quiet_window``)."""
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)

        def window() -> dict[str, Any]:
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < a.seconds:
                self.one(self.docs[n % len(self.docs)], per_chunk)
                n += 1
            elapsed = time.perf_counter() - t0
            return {"docs": n, "seconds": elapsed, "docs_per_s": n / elapsed, "per_chunk": per_chunk}

        try:
            for text in self.docs[:2]:
                self.one(text, per_chunk)
            return quiet_window(a, f"inprocess{' per chunk' if per_chunk else ''}", window)
        finally:
            torch.set_num_threads(before)


class Clients:
    """``n`` threads posting ``requests`` ((path under the application, JSON body), in turn) on kept-alive
    connections as fast as answers come; the log holds every request's (start, end, status, served version)."""

    def __init__(self, url: str, requests: list[tuple[str, str]], n: int):
        host, rest = url.removeprefix("http://").split(":", 1)
        port, _, prefix = rest.partition("/")
        self.host, self.port, self.prefix, self.requests = host, int(port), f"/{prefix}" if prefix else "", requests
        self.stop, self.lock, self.log = threading.Event(), threading.Lock(), []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        conn, k = http.client.HTTPConnection(self.host, self.port, timeout=120), i * 7
        while not self.stop.is_set():
            k += 1
            path, body = self.requests[k % len(self.requests)]
            t0, version = time.perf_counter(), None
            try:
                conn.request("POST", self.prefix + path, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                status: Any = resp.status
                version = json.loads(resp.read()).get("version")
            except (OSError, http.client.HTTPException, ValueError) as e:
                status = type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            with self.lock:
                self.log.append((t0, time.perf_counter(), status, version))
        conn.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(180)

    def window(self, t0: float, t1: float) -> list[tuple[float, float, Any, Any]]:
        with self.lock:
            return [r for r in self.log if t0 <= r[1] < t1]


def score_requests(docs: list[str]) -> list[tuple[str, str]]:
    return [("/score", json.dumps({"text": d})) for d in docs]


def cpu_times() -> dict[str, float]:
    """CPU seconds so far: Serve's replicas, proxy and controller, the registry, this process, the whole machine."""
    try:
        import psutil
    except ImportError:
        return {}
    out: dict[str, float] = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        role = ("replicas" if "ServeReplica" in cmd else "proxy" if "ProxyActor" in cmd else "controller" if "ServeController" in cmd
                else "registry" if "ServingRegistry" in cmd else None)
        if role is not None:
            try:
                t = p.cpu_times()
                out[role] = out.get(role, 0.0) + t.user + t.system
            except psutil.Error:
                pass
    me = psutil.Process().cpu_times()
    out["this process (clients)"] = me.user + me.system
    m = psutil.cpu_times()
    out["machine"] = sum(m) - m.idle - getattr(m, "iowait", 0.0)
    return out


def latency(rows: list[tuple[float, float, Any, Any]]) -> dict[str, float]:
    ms = [r[1] - r[0] for r in rows]
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": max(ms)} if ms else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cfg(port: int, name: str, **overrides: Any):
    from everlearn.deploy.serve_config import ServeConfig

    return ServeConfig(port=port, app_name=f"bench-{name.replace('_', '-')}", start_timeout_s=300, swap_timeout_s=120, **overrides)


def http_run(model_cfg, name: str, overrides: dict[str, Any], records, docs, a: argparse.Namespace, store_url: str,
             reference: InProcess) -> dict[str, Any]:
    """``--rounds`` rounds on one deployment: the in-process reference both ways (clients stopped, the replica
    idle), then ``--clients`` clients for ``--warmup`` + ``--seconds``; each round's ratio is to its own reference."""
    from everlearn.deploy.deployment import Server

    server = Server(model_cfg, serve_cfg(free_port(), name, **overrides), store_url)
    server.start(records[0])
    rounds = []
    try:
        for rnd in range(a.rounds):
            inproc = [reference.rate(a, per_chunk) for per_chunk in (False, True)]
            with Clients(server.url, score_requests(docs), a.clients) as clients:
                time.sleep(a.warmup)

                def window() -> dict[str, Any]:
                    c0, t0 = cpu_times(), time.perf_counter()
                    time.sleep(a.seconds)
                    t1, c1 = time.perf_counter(), cpu_times()
                    rows = clients.window(t0, t1)
                    ok = [r for r in rows if r[2] == 200]
                    return {"requests": len(rows), "failed": len(rows) - len(ok), "seconds": t1 - t0, "requests_per_s": len(ok) / (t1 - t0),
                            "latency_s": latency(ok), "cores": {k: (c1[k] - c0.get(k, 0.0)) / (t1 - t0) for k in c1}}

                r = quiet_window(a, name, window)
            best = max(inproc, key=lambda x: x["docs_per_s"])
            r.update(round=rnd, inprocess=inproc, reference_docs_per_s=best["docs_per_s"], ratio=r["requests_per_s"] / best["docs_per_s"])
            rounds.append(r)
            print(f"{name} round {rnd + 1}/{a.rounds}: {r['requests_per_s']:.2f} requests/s; in-process {inproc[0]['docs_per_s']:.2f} "
                  f"(per chunk {inproc[1]['docs_per_s']:.2f}) docs/s: ratio {r['ratio']:.2f}", flush=True)
    finally:
        server.stop()
    return {"variant": name, "overrides": overrides, "rounds": rounds, **summary(rounds)}


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds, and each one's range."""
    def med(get) -> dict[str, float]:
        xs = [get(r) for r in rounds]
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    return {"requests_per_s": med(lambda r: r["requests_per_s"]), "ratio": med(lambda r: r["ratio"]),
            "padded_docs_per_s": med(lambda r: r["inprocess"][0]["docs_per_s"]), "per_chunk_docs_per_s": med(lambda r: r["inprocess"][1]["docs_per_s"]),
            "latency_p50_s": statistics.median(r["latency_s"]["p50"] for r in rounds), "latency_p99_s": statistics.median(r["latency_s"]["p99"] for r in rounds),
            "failed": sum(r["failed"] for r in rounds), "outside_cores_max": max(r["outside_cores"] for r in rounds),
            "cores": {k: statistics.median(r["cores"].get(k, 0.0) for r in rounds) for k in rounds[0]["cores"]}}


def swap_run(model_cfg, records, docs, a: argparse.Namespace, store_url: str) -> dict[str, Any]:
    from everlearn.deploy.deployment import Server

    server = Server(model_cfg, serve_cfg(free_port(), "swaps", num_replicas=a.swap_replicas), store_url)
    server.start(records[0])
    swaps = []
    try:
        with Clients(server.url, score_requests(docs), a.clients) as clients:
            time.sleep(a.warmup)
            waited, _ = wait_quiet(a.quiet_below, a.quiet_timeout) if a.quiet_below > 0 else (0.0, None)
            cpu0, steady0 = cpu_snapshot(), time.perf_counter()
            time.sleep(a.seconds)
            steady1 = time.perf_counter()
            for i in range(a.swaps):
                record = {**records[(i + 1) % len(records)], "version": 100 + i}
                start = time.perf_counter()
                seconds = server.swap(record)
                held = {r["manifest_sha256"] for r in server.replicas()}
                swaps.append({"version": record["version"], "start": start - steady0, "seconds": seconds,
                              "replicas_on_new_sha": held == {record["manifest_sha256"]}})
                time.sleep(a.swap_gap_s)
            end = time.perf_counter()
            outside = cpu_delta(cpu0, cpu_snapshot())["outside this benchmark"] / (end - steady0)
        rows = clients.window(steady0, end + 600)
    finally:
        server.stop()
    during = [r for r in rows if any(r[0] < steady0 + s["start"] + s["seconds"] and r[1] > steady0 + s["start"] for s in swaps)]
    steady = [r for r in rows if steady0 <= r[1] < steady1]
    failed = [r for r in rows if r[2] != 200]
    secs = [s["seconds"] for s in swaps]
    return {"replicas": a.swap_replicas, "swaps": swaps, "swap_s": {"p50": float(np.percentile(secs, 50)), "p99": float(np.percentile(secs, 99)),
            "max": max(secs)}, "steady": latency(steady), "during_swaps": latency(during), "requests": len(rows),
            "requests_during_swaps": len(during), "failed": len(failed), "failed_examples": [str(r[2]) for r in failed[:5]],
            "all_replicas_on_new_sha": all(s["replicas_on_new_sha"] for s in swaps), "waited_for_quiet_s": waited, "outside_cores": outside,
            "timeline": [(round(r[0] - steady0, 3), round(r[1] - r[0], 4), r[2] == 200) for r in rows]}


def render(res: dict[str, Any]) -> str:
    def rng(m: dict[str, float], f: str = ".2f") -> str:
        return f"{m['median']:{f}} [{m['min']:{f}} – {m['max']:{f}}]"

    first = next(iter(res["http"].values()))
    lines = [f"Documents of {res['doc_bytes']:,} bytes (~{res['doc_tokens']:,} tokens, context {res['context']:,}); {res['clients']} "
             f"client threads; torch threads {res['torch_threads']} in-process and per replica; one replica. {res['rounds']} rounds per "
             "HTTP variant, each an in-process window both ways (the replica idle) and then the HTTP window; a round's ratio is to "
             "the faster in-process way of the same round; median [min – max] over the rounds.",
             "", "| variant | documents/s | ratio to in-process | latency p50 / p99 (s) | failed | cores: replica / proxy / clients / other processes | target |",
             "|:---|---:|---:|---:|---:|---:|:---|",
             f"| `inprocess`, one document at a time, one forward per document (its chunks padded to the longest; rounds of `http_batched`) "
             f"| {rng(first['padded_docs_per_s'])} | | | | | |",
             f"| `inprocess`, one document at a time, one forward per chunk (no padding) | {rng(first['per_chunk_docs_per_s'])} | | | | | |"]
    for name, r in res["http"].items():
        c, bold = r["cores"], "**" if name == "http_batched" else ""
        target = f">= {RATIO_TARGET:g}: {'met' if r['ratio']['median'] >= RATIO_TARGET else 'MISSED'}" if name == "http_batched" else ""
        cores = " / ".join(f"{c.get(k, float('nan')):.2f}" for k in ("replicas", "proxy", "this process (clients)"))
        cores += f" / <= {r['outside_cores_max']:.2f}"
        lines.append(f"| `{name}` {json.dumps(r['overrides']) if r['overrides'] else '(defaults)'} | {rng(r['requests_per_s'])} | "
                     f"{bold}{rng(r['ratio'])}{bold} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | {r['failed']} | {cores} | {target} |")
    waited = (f"each window waited for them to use < {res['quiet_below']:g} cores and was measured again when they used > "
              f"{res['max_outside']:g}" if res["quiet_below"] > 0 else "no window waited for them")
    outside = [w["outside_cores"] for r in res["http"].values() for rnd in r["rounds"] for w in rnd["inprocess"]]
    lines += ["", "Cores: CPU seconds per second of the HTTP window (psutil; medians over the rounds); other processes: the machine's "
              f"busy time less every process of this benchmark (procstat), i.e. other users of the machine; {waited}. In-process "
              f"windows: other processes {min(outside):.2f}-{max(outside):.2f} cores."]
    s = res["swaps"]
    ratio = s["during_swaps"].get("p99", 0) / s["steady"]["p99"] if s["steady"] else float("nan")
    lines += ["", f"Hot swaps: {len(s['swaps'])} promotions through `Server.swap` with {s['replicas']} replicas under the same load.", "",
              "| what | result | target |", "|:---|---:|:---|",
              f"| swap latency (promotion -> every replica reports the new sha256), p50 / p99 / max | {s['swap_s']['p50']:.3f} / "
              f"{s['swap_s']['p99']:.3f} / {s['swap_s']['max']:.3f} s | |",
              f"| every live replica on the new sha256 after each swap | {'yes' if s['all_replicas_on_new_sha'] else 'NO'} | yes |",
              f"| request latency p99: steady / during swaps ({s['requests_during_swaps']} requests in flight during a swap) | "
              f"{s['steady'].get('p99', 0):.2f} / {s['during_swaps'].get('p99', 0):.2f} s: **{ratio:.2f}x** | "
              f"<= {SWAP_P99_TARGET:g}x: {'met' if ratio <= SWAP_P99_TARGET else 'MISSED'} |",
              f"| failed requests during the swap phase | {s['failed']} of {s['requests']} | 0: {'met' if s['failed'] == 0 else 'MISSED'} |",
              "", f"Other processes used {s['outside_cores']:.2f} cores during the swap phase."]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"http_batched": "HTTP\nbatched", "http_unbatched": "HTTP\nunbatched", "http_serve_default_ongoing": "HTTP, Serve's\nmax_ongoing 5"}
    names = list(res["http"])
    ratios = [res["http"][n]["ratio"] for n in names]
    a1.bar([labels.get(n, n) for n in names], [r["median"] for r in ratios], color="C0",
           yerr=[[r["median"] - r["min"] for r in ratios], [r["max"] - r["median"] for r in ratios]], capsize=4)
    a1.axhline(RATIO_TARGET, color="red", ls="--", label=f"target {RATIO_TARGET:g} x in-process")
    a1.set_ylabel("HTTP / in-process documents/s (same round)")
    a1.set_title(f"/score, {res['clients']} clients")
    a1.legend(loc="lower right")
    s = res["swaps"]
    t = np.array([r[0] for r in s["timeline"]])
    lat = np.array([r[1] for r in s["timeline"]])
    a2.scatter(t, lat, s=4, color="C0", label="request latency")
    for i, w in enumerate(s["swaps"]):
        a2.axvspan(w["start"], w["start"] + max(w["seconds"], 0.05), color="C3", alpha=0.4, label="swap" if i == 0 else None)
    a2.set_xlabel("seconds")
    a2.set_ylabel("seconds")
    a2.set_title(f"Requests while swapping ({s['replicas']} replicas)")
    a2.legend(loc="upper right")
    return save_figure(plt, fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--doc-bytes", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, help="HTTP variants (default all; --quick http_batched)")
    ap.add_argument("--rounds", type=int, default=None, help="in-process + HTTP windows per HTTP variant (default 3; --quick 1)")
    ap.add_argument("--swaps", type=int, default=None)
    ap.add_argument("--swap-gap-s", type=float, default=2.0)
    ap.add_argument("--swap-replicas", type=int, default=None)
    ap.add_argument("--name", default="serving", help="the output files' name: NAME.md, .json, .png")
    ap.add_argument("--quiet-below", type=float, default=None, help="before each window, wait (up to --quiet-timeout s) until other "
                    "processes use fewer cores than this (default 0.15; --quick 0: do not wait)")
    ap.add_argument("--quiet-timeout", type=float, default=900.0)
    ap.add_argument("--max-outside", type=float, default=0.25, help="a window in which other processes used more cores is measured again")
    ap.add_argument("--retries", type=int, default=None, help="how often a disturbed window is measured again (default 2; --quick 0)")
    a = ap.parse_args(argv)
    q = a.quick
    a.doc_bytes = a.doc_bytes or (300 if q else 1500)
    a.clients, a.seconds, a.warmup = a.clients or (4 if q else 20), a.seconds or (3.0 if q else 15.0), a.warmup or (1.0 if q else 5.0)
    a.rounds = a.rounds or (1 if q else 3)
    a.swaps, a.swap_replicas = a.swaps or (3 if q else 12), a.swap_replicas or (1 if q else 2)
    a.quiet_below = (0.0 if q else 0.15) if a.quiet_below is None else a.quiet_below
    a.retries = (0 if q else 2) if a.retries is None else a.retries
    if q:
        a.swap_gap_s = min(a.swap_gap_s, 0.5)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only Ray
    # Ray starts its workers (the replica) at niceness 15: then the in-process reference, at 0, and this
    # process's clients and Ray's own processes would take the replica's core whenever they run. Equal terms.
    os.environ.setdefault("RAY_worker_niceness", str(os.getpriority(os.PRIO_PROCESS, 0)))
    import ray
    import torch

    from everlearn.deploy.serve_config import ServeConfig
    from everlearn.learners import ModelConfig

    t_start = time.perf_counter()
    info = machine_info(torch=torch.__version__, ray=ray.__version__)
    print(f"machine: {info['nproc']} cpus, load average {info['loadavg_at_start'][0]:.2f}" + ("  [--quick]" if q else ""), flush=True)
    model_cfg, threads = ModelConfig(**(TINY if q else {})), ServeConfig().torch_threads
    tmp = Path(tempfile.mkdtemp(prefix="everlearn-serving-"))
    docs = documents(200, a.doc_bytes)
    records = checkpoints(model_cfg, tmp / "checkpoints", 3)
    print(f"{len(records)} checkpoints committed", flush=True)
    reference = InProcess(model_cfg, records[0], docs, threads)
    ray.init(num_cpus=info["nproc"], include_dashboard=False, log_to_driver=False, configure_logging=False, object_store_memory=256 * 2**20)
    http: dict[str, Any] = {}
    try:
        for name in a.variants or (["http_batched"] if q else list(VARIANTS)):
            overrides = VARIANTS[name]
            http[name] = http_run(model_cfg, name, overrides, records, docs, a, str(tmp / "checkpoints"), reference)
        swaps = swap_run(model_cfg, records, docs, a, str(tmp / "checkpoints"))
        print(f"swaps: p50 {swaps['swap_s']['p50']:.3f} s, failed {swaps['failed']} of {swaps['requests']}", flush=True)
    finally:
        ray.shutdown()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    from everlearn.learners import build_tokenizer

    res: dict[str, Any] = {
        "command": command_line(), "quick": q, "machine": info, "date": time.strftime("%Y-%m-%d"), "doc_bytes": a.doc_bytes,
        "doc_tokens": int(statistics.median(len(build_tokenizer(model_cfg).encode(d)) for d in docs)), "context": model_cfg.max_position_embeddings,
        "model": model_cfg.model_dump(), "quiet_below": a.quiet_below, "max_outside": a.max_outside, "clients": a.clients,
        "torch_threads": threads, "seconds": a.seconds, "warmup": a.warmup, "rounds": a.rounds, "http": http, "swaps": swaps, "targets": {"http_over_inprocess": RATIO_TARGET, "swap_p99_over_steady": SWAP_P99_TARGET, "failed": 0},
    }
    report(res, a.out, a.name, title="Serving: /score throughput over HTTP, and hot swaps under load",
           intro="Client, Ray, the proxy and the replicas share the machine's cores; the client is in the benchmark's process.",
           versions={"torch": "torch", "ray": "ray"}, setting=f"Run on {res['date']}. ", render=render, plot=plot,
           image_alt="documents/s per variant; request latency while swapping", raw_note=" (every request of the swap phase)", t_start=t_start)
    return res


if __name__ == "__main__":
    main()
