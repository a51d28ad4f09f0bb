"""The benchmarks run (small) and write what docs/ links to; they report, nothing here times them."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
