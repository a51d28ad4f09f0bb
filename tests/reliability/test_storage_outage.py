"""Storage outages: the S3 server behind a TCP proxy that blackholes, then resets, then comes back.

The stream and the checkpoints are both on s3:// through the proxy. While the
store is unreachable the daemon stays up: source polls and checkpoint writes
retry with backoff, each failure is counted, /status says ``degraded`` and
/healthz answers 503; the position never moves past what was read. Objects
another client uploads meanwhile are picked up, and once the store answers again
the run checkpoints, clears ``degraded`` and loses nothing. The objects uploaded during
and after the outages are compressed (.jsonl.gz, .jsonl.zst).
"""

import gzip
import json
import time
import urllib.error
import urllib.request

import pytest
import s3fs
import zstandard

from everlearn.learners import CheckpointStore
from tests.e2e.helpers import DaemonProcess, get_json, healthz_status, tiny_config, wait_for
from tests.proxy import Proxy
from tests.reliability.harness import HOLDOUT, events, jsonl, man_docs, surviving_lineage

pytestmark = pytest.mark.reliability


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _jsonl_bytes(docs) -> bytes:
    return b"".join(json.dumps({"id": i, "text": t, "domain": "man"}).encode() + b"\n" for i, t in docs)


def test_blackholes_and_resets_of_the_store_degrade_the_daemon_and_lose_nothing(s3_bucket, tmp_path, port_factory):
    url, opts = s3_bucket
    direct = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    bucket = url.removeprefix("s3://")
    docs = man_docs(36_000)
    first, later = docs[: len(docs) // 2], docs[len(docs) // 2 :]
    later, last = later[: len(later) // 2], later[len(later) // 2 :]
    direct.pipe(f"{bucket}/stream/00-man.jsonl", _jsonl_bytes(first))
    proxy = Proxy(int(opts["client_kwargs"]["endpoint_url"].rsplit(":", 1)[1]))
    via = {**opts, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}, "skip_instance_cache": True,
           "config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}}}
    metrics_port = port_factory()
    config = tiny_config(tmp_path, port_factory(), metrics_port,
                         source={"url": f"{url}/stream", "storage_options": via, "settle_s": 0.2},
                         checkpoint={"url": f"{url}/ckpt", "storage_options": via, "every_steps": 5, "keep_last": 2, "io_timeout_s": 3},
                         gate={"every_steps": 10**6}, serve={"enabled": False},
                         train={"queue_windows": 4096},  # ingest reads the whole first object ahead, then polls on through the outages
                         supervision={"degraded_after_s": 3, "checkpoint_retry_s": 3, "backoff_base_s": 0.2, "backoff_max_s": 2,
                                      "lease_ttl_s": 60})
    base = f"http://127.0.0.1:{metrics_port}"
    daemon = DaemonProcess(config, log=tmp_path / "run.log")
    try:
        wait_for(lambda: get_json(f"{base}/status")["step"] >= 10, 240, "training with checkpoints on s3", daemon)
        assert healthz_status(base) == 200
        for mode in ("blackhole", "reset"):
            proxy.set(mode)
            wait_for(lambda: get_json(f"{base}/status")["degraded"], 60, f"degraded while the store is {mode}", daemon)
            assert healthz_status(base) == 503
            if mode == "blackhole":  # another client uploads (compressed) while the daemon cannot reach the store
                direct.pipe(f"{bucket}/stream/01-man.jsonl.gz", gzip.compress(_jsonl_bytes(later)))
            time.sleep(4)
            assert daemon.proc.poll() is None
            proxy.set("up")
            wait_for(lambda: not get_json(f"{base}/status")["degraded"], 90, "healthy once the store is back", daemon)
            assert healthz_status(base) == 200
        assert _metric(base, "everlearn_checkpoint_failures_total") >= 1
        assert _metric(base, "everlearn_source_errors_total") >= 1
        direct.pipe(f"{bucket}/stream/02-man.jsonl.zst", zstandard.ZstdCompressor().compress(_jsonl_bytes(last)))
        total = len(docs)
        wait_for(lambda: get_json(f"{base}/status")["documents"] >= total, 240, "the objects uploaded during and after the outages", daemon)
        wait_for(lambda: get_json(f"{base}/status")["pending_tokens"] < 8 * 64, 240, "the stream trained on", daemon)
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        daemon.kill()
        proxy.close()
    evs = events(tmp_path / "run.log")
    assert any(e["event"] == "checkpoint_failed" for e in evs) and any(e["event"] == "source_error" for e in evs)
    assert any(e["event"] == "source_recovered" for e in evs)
    store = CheckpointStore(f"{url}/ckpt", opts)
    stopped = [e for e in evs if e["event"] == "stopped"][-1]
    assert store.latest().step == stopped["step"]
    for name in store._step_dirs():
        store.verify(store.ref(name))  # only whole checkpoints among them; partial writes were set aside
    # nothing lost: every document is trained (exactly once, contiguously) or held out, or still pending
    from everlearn.daemon.holdout import content_key, held_out
    from everlearn.daemon.runstate import INGEST_META
    from everlearn.learners import ModelConfig, build_tokenizer

    state = json.loads(store.read(store.latest(), INGEST_META))
    pending = {s["id"]: s["start"] for s in state["packer"]["segments"]}
    spans: dict[str, list] = {}
    for rec in surviving_lineage(tmp_path / "run"):
        for doc_id, start, end in rec["spans"]:
            spans.setdefault(doc_id, []).append((start, end))
    tok = build_tokenizer(ModelConfig())
    for doc_id, text in docs:
        if held_out(content_key(text), HOLDOUT):
            continue
        pos = 0
        for start, end in sorted(spans.get(doc_id, [])):
            assert start == pos, (doc_id, sorted(spans.get(doc_id, [])))
            pos = end
        assert pos == pending.get(doc_id, len(tok.encode(text)) + 1), doc_id
    assert not jsonl(tmp_path / "run" / "dead_letter.jsonl")
