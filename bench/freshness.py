"""Benchmark of freshness: how long from a record produced to Kafka until serving answers with a version trained on it.

It measures and reports; it never asserts a timing (the target is shown next to
the numbers, marked met or missed).

What is measured
----------------
``everlearn run`` (the real CLI, in its own process) on the demo config (the
embedded default: the 4 x 256 model, batch 8 x 256, gates every 50 steps,
checkpoints every 100, serving on) with ``source.url`` a 3-partition topic on a
Tansu broker this script starts on loopback. Once the daemon is ready, a
producer sends ``--rate`` records per second (each ``{"id", "text"}`` with about
``--doc-bytes`` bytes of real text) for ``--seconds``; the rate is chosen below
what the learner consumes, as a service must be sized (otherwise a backlog grows
without bound and so does freshness). A watcher asks serving's ``/version``
every 0.2 s and notes when each version is first served.

For each record: produced at ``t0`` (just before ``send``); trained at step ``s``
(the last step with a span of it in the surviving lineage: all its tokens are in
the model); first served at ``t1`` = the first time ``/version`` answered a
version whose candidate step (audit log) is >= ``s``. Freshness = ``t1 - t0``.
Held-out records (15 %, never trained) are left out; records not served before
the end are counted and reported.

DESIGN target: p50 < 60 s on the demo config.

Command (from the repository root)::

    .venv/bin/python bench/freshness.py --out docs/bench

``--quick``: a tiny model, gates every 10 steps, 20 s of records (a smoke run).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import NO_PLOT, command_line, machine_info, pyplot, report, save_figure  # noqa: E402 (bench/ is not a package)
from kafka_ingest import start_tansu, stop_tansu  # noqa: E402

TARGET_P50_S = 60.0
QUICK = {"model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128},
         "train": {"seq_len": 64, "torch_threads": 1}, "gate": {"every_steps": 10}, "checkpoint": {"every_steps": 20},
         "holdout": {"fresh_capacity": 32, "old_capacity": 64}}


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _texts(n: int, doc_bytes: int) -> list[str]:
    from everlearn.daemon import demo

    text = "".join(t for _, t in demo.take(demo.man_pages(), n * doc_bytes // 2))
    text += "".join(t for _, t in demo.take(demo.python_sources(), n * doc_bytes - len(text)))
    return [text[(i * doc_bytes) % max(1, len(text) - doc_bytes):][:doc_bytes] for i in range(n)]


def run(args, tmp: Path, bootstrap: str) -> dict[str, Any]:
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"fresh-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 3, 1)])
    admin.close()
    serve_port, metrics_port = _free_port(), _free_port()
    cfg: dict[str, Any] = {"run_dir": str(tmp / "run"), "source": {"url": f"kafka://{bootstrap}/{topic}",
                           "kafka": {"session_timeout_ms": 6000, "heartbeat_interval_ms": 500}},
                           "serve": {"port": serve_port}, "metrics": {"port": metrics_port}, "demo": {"seed_if_empty": False}}
    for section, values in (QUICK if args.quick else {}).items():
        cfg.setdefault(section, {}).update(values)
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "everlearn.daemon", "run", "-c", str(tmp / "config.yaml")], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: dict[int, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            try:
                v = _get(f"http://127.0.0.1:{serve_port}/version")["version"]
            except (OSError, ValueError, KeyError):
                continue
            seen.setdefault(v, time.time())

    sent: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 300
        while 0 not in seen and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {(tmp / 'daemon.log').read_text()[-3000:]}")
            try:
                seen[_get(f"http://127.0.0.1:{serve_port}/version")["version"]] = time.time()
            except OSError:
                time.sleep(0.5)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        texts = _texts(int(args.rate * args.seconds) + 1, args.doc_bytes)
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        t_start = time.monotonic()
        for i, text in enumerate(texts):
            time.sleep(max(0.0, t_start + i / args.rate - time.monotonic()))
            doc_id = f"r{i:06d}"
            sent[doc_id] = time.time()
            producer.send(topic, value=json.dumps({"id": doc_id, "text": text}).encode(), partition=i % 3)
        producer.flush()
        producer.close()
        print(f"produced {len(sent)} records in {time.monotonic() - t_start:.0f} s; waiting for the last ones to be served", flush=True)
        time.sleep(args.drain)
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    return {"sent": sent, "seen": seen, "run": tmp / "run", "config": cfg}


def analyse(sent: dict[str, float], seen: dict[int, float], run: Path) -> dict[str, Any]:
    trained_at: dict[str, int] = {}
    kept: list[dict[str, Any]] = []
    for line in (run / "lineage.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "resumed_from_step" in rec:
            kept = [r for r in kept if r["step"] <= rec["resumed_from_step"]]
        else:
            kept.append(rec)
    for rec in kept:
        for doc_id, _, _ in rec["spans"]:
            trained_at[doc_id] = rec["step"]  # the last step with a span of it
    audit = [json.loads(x) for x in (run / "audit.jsonl").read_text().splitlines()]
    version_step = {a["promoted_version"]: a["candidate"]["step"] for a in audit if a.get("verdict") == "promoted"}
    served = sorted((seen[v], step) for v, step in version_step.items() if v in seen)
    fresh, unserved = [], 0
    for doc_id, t0 in sent.items():
        s = trained_at.get(doc_id)
        if s is None:
            continue  # held out (never trained), or still pending at the stop
        t1 = next((t for t, step in served if step >= s), None)
        if t1 is None:
            unserved += 1
        else:
            fresh.append((t0, t1 - t0))
    lat = np.array([f for _, f in fresh])
    q = (lambda p: float(np.percentile(lat, p))) if len(lat) else (lambda p: float("nan"))
    return {"records": len(sent), "trained": sum(1 for d in sent if d in trained_at), "served": len(fresh), "not_served_by_the_end": unserved,
            "p50_s": q(50), "p90_s": q(90), "max_s": float(lat.max()) if len(lat) else float("nan"),
            "promotions": len(version_step), "versions_seen": len(seen), "points": fresh,
            "gate_seconds": [a.get("judge_seconds") for a in audit if a.get("verdict") == "promoted"]}


def render(res: dict[str, Any]) -> str:
    a = res["result"]
    ok = "met" if a["p50_s"] < TARGET_P50_S else "MISSED"
    judge = [x for x in a["gate_seconds"] if x is not None]
    return "\n".join([
        f"{a['records']} records produced at {res['rate']:g}/s for {res['produce_seconds']} s (about {res['doc_bytes']} bytes each); "
        f"{a['trained']} trained (the rest held out), {a['served']} of them served by the end, {a['not_served_by_the_end']} not yet; "
        f"{a['promotions']} promotions" + (f", judgement median {statistics.median(judge):.2f} s" if judge else "") + ".",
        "",
        "| produced -> first served by a version trained on it | seconds | target |",
        "|:---|---:|:---|",
        f"| p50 | **{a['p50_s']:.1f}** | < {TARGET_P50_S:g}: {ok} |",
        f"| p90 | {a['p90_s']:.1f} | |",
        f"| max | {a['max_s']:.1f} | |",
    ])


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    pts = res["result"]["points"]
    if not pts:
        return "no record was served: no plot written"
    t0 = min(t for t, _ in pts)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.scatter([t - t0 for t, _ in pts], [f for _, f in pts], s=6)
    a1.axhline(TARGET_P50_S, color="red", ls="--", label=f"target p50 < {TARGET_P50_S:g} s")
    a1.set_xlabel("produced at (s)")
    a1.set_ylabel("seconds until served")
    a1.set_title("Each record: a sawtooth of gate intervals")
    a1.legend()
    xs = np.sort([f for _, f in pts])
    a2.plot(xs, np.arange(1, len(xs) + 1) / len(xs))
    a2.axvline(TARGET_P50_S, color="red", ls="--")
    a2.set_xlabel("seconds until served")
    a2.set_ylabel("fraction of records")
    a2.set_title("Distribution")
    return save_figure(plt, fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate", type=float, default=None, help="records per second (default 3; --quick 4)")
    ap.add_argument("--seconds", type=int, default=None, help="how long records are produced (default 180; --quick 20)")
    ap.add_argument("--doc-bytes", type=int, default=1000)
    ap.add_argument("--drain", type=float, default=None, help="seconds to wait after the last record (default 90; --quick 30)")
    args = ap.parse_args(argv)
    args.rate = args.rate or (4.0 if args.quick else 3.0)
    args.seconds = args.seconds or (20 if args.quick else 180)
    args.drain = args.drain if args.drain is not None else (30.0 if args.quick else 90.0)
    import torch

    t_start = time.perf_counter()
    info = machine_info(torch=torch.__version__)
    proc, bootstrap = start_tansu()
    tmp = Path(tempfile.mkdtemp(prefix="everlearn-fresh-"))
    try:
        out = run(args, tmp, bootstrap)
        result = analyse(out["sent"], out["seen"], out["run"])
    finally:
        stop_tansu(proc)
    res = {"command": command_line(), "quick": args.quick, "machine": info, "date": time.strftime("%Y-%m-%d"), "rate": args.rate,
           "produce_seconds": args.seconds, "doc_bytes": args.doc_bytes, "config_overrides": out["config"], "result": result,
           "target_p50_s": TARGET_P50_S}
    report(res, args.out, "freshness", title="Freshness: produced to Kafka -> served by a version trained on it",
           intro="The daemon is the real CLI on the demo config with a Kafka source; serving is asked for its version every 0.2 s.",
           versions={"torch": "torch"}, setting=f"Run on {res['date']}. ", render=render, plot=plot,
           image_alt="freshness per record and its distribution", raw_note=" (every record's point)", t_start=t_start)
    return res


if __name__ == "__main__":
    main()
