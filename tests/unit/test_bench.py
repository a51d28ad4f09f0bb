"""The benchmarks run (small) and write what docs/ links to; they report, nothing here times them."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_reservoir_bench_quick_run_writes_tables_json_and_plot(tmp_path, capsys):
    load("reservoir").main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "reservoir.json").read_text())
    assert [r["N_over_k"] for r in res["insert"]] == [10, 100]
    assert {r["kind"] for r in res["kinds"]} == {"uniform", "weighted", "stratified"}
    assert [m["kind"] for m in res["rss"]] == ["uniform", "weighted", "stratified"]
    assert all(r["L"]["ns_per_item"] > 0 and r["R"]["ns_per_item"] > 0 for r in res["insert"])
    md = (tmp_path / "reservoir.md").read_text()
    assert res["command"] in md and "| stratified |" in md
    assert (tmp_path / "reservoir.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in capsys.readouterr().out


@pytest.mark.integration  # starts a local Ray and the real daemon (tiny model, a few dozen steps)
@pytest.mark.timeout(240)
def test_daemon_throughput_bench_quick_run_writes_tables_json_and_plot(tmp_path, capsys):
    load("daemon_throughput").main(["--quick", "--out", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    res = json.loads((tmp_path / "daemon_throughput.json").read_text())
    variants = ["bare", "bare_learner", "daemon", "daemon_no_gates", "daemon_no_gates_no_ckpt"]
    assert list(res["runs"]) == variants
    for v in variants:
        assert len(res["runs"][v]) == 1 and res["runs"][v][0]["tokens_per_s"] > 0
        assert res["summary"][v]["tokens_per_s_median"] > 0 and res["summary"][v]["ratio_to_bare"] > 0
    for v in variants[2:]:  # the window's tokens are the ones the run's own registry counted
        run = res["runs"][v][0]
        assert run["tokens_registry_check"] and run["steps"] == res["setup"]["measure"]
        assert run["registry"]["train_step_seconds_sum"] > 0 and "train_wait_seconds" in run["registry"]
    assert res["runs"]["daemon"][0]["registry"]["judge_seconds_count"] >= 1  # gates ran in the window
    assert res["runs"]["daemon_no_gates_no_ckpt"][0]["registry"]["checkpoints"] == 0
    md = (tmp_path / "daemon_throughput.md").read_text()
    assert res["command"] in md and "| `daemon_no_gates` |" in md and "ratio to bare" in md
    assert (tmp_path / "daemon_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in capsys.readouterr().out


@pytest.mark.integration  # starts a Tansu broker; a small model for the learner's rate
def test_kafka_ingest_bench_quick_run_writes_tables_json_and_plot(tmp_path, capsys):
    res = load("kafka_ingest").main(["--quick", "--out", str(tmp_path), "--records", "600"])
    for name in ("raw", "ingest"):
        assert [r["records"] for r in res["runs"][name]] == [600] and res["summary"][name]["median"] > 0
    ingest = res["runs"]["ingest"][0]
    assert ingest["documents"] + ingest["dead_lettered"] == 600 and ingest["train_tokens"] > 0
    assert res["learner"]["stream_tokens_per_s"] > 0
    md = (tmp_path / "kafka_ingest.md").read_text()
    assert res["command"] in md and "| `raw` kafka-python loop (reference) |" in md
    assert (tmp_path / "kafka_ingest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration  # starts a local Ray and Serve (a tiny model, 3 s windows)
@pytest.mark.timeout(240)
def test_serving_bench_quick_run_writes_tables_json_and_plot(tmp_path, capsys):
    res = load("serving").main(["--quick", "--out", str(tmp_path)])
    batched = res["http"]["http_batched"]
    (one,) = batched["rounds"]
    assert [w["per_chunk"] for w in one["inprocess"]] == [False, True] and one["reference_docs_per_s"] > 0
    assert batched["requests_per_s"]["median"] > 0 and batched["ratio"]["median"] > 0 and batched["failed"] == 0
    assert batched["latency_p99_s"] > 0 and batched["cores"]["replicas"] > 0
    swaps = res["swaps"]
    assert len(swaps["swaps"]) == 3 and swaps["all_replicas_on_new_sha"] and swaps["failed"] == 0 and swaps["swap_s"]["p50"] > 0
    md = (tmp_path / "serving.md").read_text()
    assert res["command"] in md and "| `http_batched` (defaults) |" in md and "swap latency" in md
    assert (tmp_path / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in capsys.readouterr().out


@pytest.mark.unit
def test_gate_quality_bench_quick_run_writes_tables_json_and_plot(tmp_path, capsys):
    res = load("gate_quality").main(["--quick", "--out", str(tmp_path)])
    (seed,) = res["seeds"]
    kinds = load("gate_quality").KINDS
    assert set(seed) == set(kinds)
    assert seed["poison: NaN weight"]["promoted"] is False and seed["poison: NaN weight"]["gates"] == {"sanity": False}
    assert all(set(seed[k]["gates"]) == {"sanity", "improvement", "forgetting", "anchor", "behaviour", "generation"} for k in kinds[:5])
    md = (tmp_path / "gate_quality.md").read_text()
    assert res["command"] in md and "| poison: ROT13 manual pages |" in md
    assert (tmp_path / "gate_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
