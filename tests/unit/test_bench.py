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
    work = tmp_path / "work"
    variants = ["bare", "daemon", "daemon_no_gates_no_ckpt"]  # the reference, the whole daemon and its leanest form (the suite's time is bounded)
    lora = ["bare_lora", "daemon_no_gates_lora"]  # the LoRA family's reference and headline row (the suite's time is bounded)
    load("daemon_throughput").main(["--quick", "--out", str(tmp_path), "--work-dir", str(work), "--variants", ",".join(variants + lora)])
    res = json.loads((tmp_path / "daemon_throughput.json").read_text())
    assert list(res["runs"]) == variants + lora
    for v in variants + lora:
        assert len(res["runs"][v]) == 1 and res["runs"][v][0]["tokens_per_s"] > 0
        assert res["summary"][v]["tokens_per_s_median"] > 0 and res["summary"][v]["ratio_to_bare"] > 0
    for v in variants[1:] + lora[1:]:  # the window's tokens are the ones the run's own registry counted
        run = res["runs"][v][0]
        assert run["tokens_registry_check"] and run["steps"] == res["setup"]["measure"]
        assert run["registry"]["train_step_seconds_sum"] > 0 and "train_wait_seconds" in run["registry"]
    assert res["runs"]["daemon"][0]["registry"]["judge_seconds_count"] >= 1  # gates ran in the window
    assert res["runs"]["daemon_no_gates_no_ckpt"][0]["registry"]["checkpoints"] == 0
    # LoRA rows are against the bare LoRA loop; the LoRA daemon wrote adapters, the others full weights
    assert all(res["summary"][v]["reference"] == "bare_lora" for v in lora) and res["summary"]["bare_lora"]["ratio_to_bare"] == 1
    assert 0 < res["setup"]["lora"]["trainable_parameters"] < res["setup"]["parameters"] and res["setup"]["lora"]["r"] == 8
    assert res["summary"]["lora_over_full_bare"] > 0
    for v in variants[1:] + lora[1:]:
        (run_dir,) = work.glob(f"run-*-{v}")
        files = {f.name for f in (run_dir / "checkpoints").glob("step-*/*.safetensors")}
        assert ("adapter.safetensors" in files) == v.endswith("_lora") and ("model.safetensors" in files) != v.endswith("_lora")
    md = (tmp_path / "daemon_throughput.md").read_text()
    assert res["command"] in md and "| `daemon_no_gates_no_ckpt` |" in md and "ratio to bare" in md
    assert "| `daemon_no_gates_lora` |" in md and "ratio to `bare_lora`" in md
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


@pytest.mark.unit
def test_branch_cost_bench_quick_run_writes_tables_json_and_plot(tmp_path, capsys):
    res = load("branch_cost").main(["--quick", "--out", str(tmp_path)])
    assert {r["anneal_steps"] for r in res["runs"]} == {2, 4} and res["setting"]["judgements"] >= 1
    for r in res["runs"]:  # the losses are measured: finite, and the trunk's later loss is another model's
        assert all(0 < r[k] < 10 for k in ("trunk", "branch", "trunk_later")) and r["trunk_later"] != r["trunk"]
    md = (tmp_path / "branch_cost.md").read_text()
    assert res["command"] in md and "| 4 | 4 |" in md
    assert (tmp_path / "branch_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.unit
def test_swap_bench_quick_run_writes_tables_json_and_plot(tmp_path, capsys):
    res = load("swap").main(["--quick", "--out", str(tmp_path)])
    (tiny,) = res["models"].values()
    for kind in ("full", "lora"):
        load_ = tiny["load"][kind]
        assert load_["n"] == 3 and load_["median"] > 0 and load_["p90"] >= load_["median"] and load_["first_s"] > 0
        swaps = tiny["replica"][kind]["swap_s"]
        assert swaps["n"] == 2 and swaps["median"] > 0
    # the adapter checkpoint is the small one, and a loaded LoRA version shares every base tensor
    assert tiny["bytes"]["lora"]["model_files"] < tiny["bytes"]["full"]["model_files"] / 10
    assert set(tiny["bytes"]["lora"]["files"]) == {"adapter.safetensors", "base.json"} and set(tiny["bytes"]["full"]["files"]) == {"model.safetensors"}
    assert tiny["load"]["lora"]["own_bytes"] < tiny["load"]["full"]["own_bytes"] / 10
    assert [s["kind"] for s in tiny["replica"]["swaps"]] == ["lora", "full", "lora", "full"]
    assert tiny["base"]["build_s"] > 0 and len(tiny["base"]["sha256"]) == 64
    md = (tmp_path / "swap.md").read_text()
    assert res["command"] in md and "`Models.load` median / p90" in md and "| tiny: 2 x 64, 0.1M | LoRA" in md
    assert (tmp_path / "swap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in capsys.readouterr().out


@pytest.mark.unit
def test_gpu_bench_peak_flops_table_names_the_cards():
    peak = load("gpu").peak_tflops
    assert peak("NVIDIA H200") == 989 and peak("NVIDIA H100 80GB HBM3") == 989 and peak("NVIDIA H100 PCIe") == 756
    assert peak("NVIDIA A100-SXM4-80GB") == 312 and peak("NVIDIA L4") == 121 and peak("NVIDIA L40S") == 362
    assert peak("Tesla T4") is None and peak("CPU (no CUDA)") is None


@pytest.mark.unit
def test_gpu_bench_without_cuda_runs_only_quick_and_never_into_docs(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine would run the real benchmark")
    gpu = load("gpu")
    with pytest.raises(SystemExit):
        gpu.main(["--out", str(tmp_path)])  # the full run needs a GPU
    with pytest.raises(SystemExit):
        gpu.main(["--quick", "--out", str(gpu.DOCS_BENCH)])  # CPU smoke numbers are not the GPU benchmark's
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.integration  # starts a local Ray for the learner actor
@pytest.mark.timeout(240)
def test_gpu_bench_quick_run_writes_tables_json_and_plot(tmp_path, capsys):
    res = load("gpu").main(["--quick", "--out", str(tmp_path)])
    p = res["parity"]
    assert p["runs"]["cpu fp32"]["max_rel_diff"] == 0 and len(p["runs"][p["bf16_run"]]["losses"]) == p["steps"] == 5
    assert p["within_tolerance"] and p["tolerance_rel"] == 0.01
    s = res["mfu"]["summary"]
    assert list(s) == ["bare", "learner", "learner_actor"]
    assert all(s[v]["tokens_per_s_median"] > 0 and s[v]["tflops"] > 0 for v in s)
    if res["device"] == "cpu":
        assert res["peak_tflops"] is None and all(s[v]["mfu"] is None for v in s)
    md = (tmp_path / "gpu.md").read_text()
    assert res["command"] in md and "| `learner_actor` |" in md and "max relative difference" in md
    assert (tmp_path / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in capsys.readouterr().out
