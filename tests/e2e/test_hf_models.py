"""The daemon on Hugging Face model directories: GPT-2 with full fine-tuning, Qwen2 with LoRA adapters.

Each run trains on a stream, judges, promotes and serves the model, as a user runs it
(`everlearn run` in its own process); the LoRA run's checkpoints hold adapters only and
its served version is exported merged and loaded back with transformers.
"""

import json
import subprocess

import pytest
import torch

from everlearn.daemon import demo
from everlearn.learners.checkpoints import CheckpointStore
from tests.e2e.helpers import EVERLEARN, DaemonProcess, get_json, post_json, tiny_config, wait_for
from tests.hf_models import save_tiny

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(("family", "lora"), [("gpt2", None), ("qwen2", 4)], ids=["gpt2-full", "qwen2-lora"])
def test_a_model_directory_trains_promotes_and_serves(tmp_path, port_factory, family, lora):
    model_dir = save_tiny(family, tmp_path / family, width=64, layers=2, context=128)
    serve_port, metrics_port = port_factory(), port_factory()
    config = tiny_config(tmp_path, serve_port, metrics_port,
                         model={"name_or_path": str(model_dir), "lora": {"r": lora, "alpha": 16.0}},
                         schedule={"warmup_steps": 5, "cooldown_steps": 10, "peak_lr": 1e-2 if lora else 3e-3,
                                   "constant_lr": 5e-3 if lora else 1e-3, "min_lr": 1e-4})
    base = f"http://127.0.0.1:{serve_port}"
    docs = demo.take(demo.python_sources(), 80_000)
    probe = "".join(text for _, text in demo.take(demo.python_sources(), 3000, skip_bytes=400_000))
    with open(tmp_path / "stream" / "00-python.jsonl", "w") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text, "domain": "python"}) + "\n")

    daemon = DaemonProcess(config, log=tmp_path / "run.log")
    try:
        wait_for(lambda: get_json(f"{base}/version")["version"] >= 0, 180, "serving", daemon)
        before = post_json(f"{base}/score", {"text": probe})
        wait_for(lambda: get_json(f"{base}/version")["version"] > 0, 300, "a promotion", daemon)
        after = post_json(f"{base}/score", {"text": probe})
        assert after["loss"] < before["loss"], (before, after)
        model_id = get_json(f"{base}/v1/models")["data"][0]["id"]
        completion = post_json(f"{base}/v1/completions", {"model": model_id, "prompt": "def ", "max_tokens": 8})
        assert completion["choices"][0]["text"] is not None

        def consistent():  # a version and its /score answer, taken while no promotion came between
            first, short, last = get_json(f"{base}/version"), post_json(f"{base}/score", {"text": probe[:200]}), get_json(f"{base}/version")
            return (first, short) if first["version"] == short["version"] == last["version"] else None

        served, short = wait_for(consistent, 60, "a /score answer and /version that agree", daemon)
        learner = get_json(f"http://127.0.0.1:{metrics_port}/status")["learner"]
        assert learner["model"] == str(model_dir) and learner["model_type"] == family and learner["lora_r"] == lora
        assert (learner["trainable"] < learner["parameters"] / 5) if lora else (learner["trainable"] == learner["parameters"])
        cli = subprocess.run([*EVERLEARN, "status", "-c", str(config)], capture_output=True, text=True, timeout=60)
        assert f"learner: {model_dir} ({family})" in cli.stdout, cli.stdout + cli.stderr
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        daemon.kill()

    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    files = store.manifest(store.ref(served["checkpoint"].rsplit("/", 1)[-1]))["files"]
    if lora:  # the served checkpoint is an adapter, a small fraction of the model
        assert "adapter.safetensors" in files and "model.safetensors" not in files
        assert files["adapter.safetensors"]["size"] < (model_dir / "model.safetensors").stat().st_size / 5
    else:
        assert "model.safetensors" in files and "adapter.safetensors" not in files

    out = tmp_path / "exported"
    cli = subprocess.run([*EVERLEARN, "export", "-c", str(config), str(served["step"]), str(out), "--merged"], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["manifest_sha256"] == served["manifest_sha256"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)(probe[:200], add_special_tokens=False)["input_ids"]
    assert len(ids) == short["tokens"] + 1 <= 128  # one context: the served loss came from one forward too
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert loss == pytest.approx(short["loss"], rel=1e-4)  # the exported model is the served one (merged: rounding only)
    if lora:
        base_changed_refuses_to_resume(config, model_dir, family, tmp_path)


def base_changed_refuses_to_resume(config, model_dir, family: str, tmp_path) -> None:
    """Someone replaced the base's weights in place under a LoRA run: the restart is refused, exit 2, naming the base."""
    save_tiny(family, model_dir, width=64, layers=2, context=128)  # new random weights, same shape
    again = DaemonProcess(config, "--max-steps", "3", log=tmp_path / "base-changed.log")
    try:
        code = again.wait(240)
    finally:
        again.kill()
    assert code == 2, again.tail()
    message = [line for line in again.tail().splitlines() if line.startswith("everlearn run: ")]
    assert message and "set model.name_or_path to that base" in message[-1] and "ray::" not in message[-1], again.tail()
    # nothing was set aside: the checkpoint is fine, the configuration is not
    assert not (tmp_path / "run" / "checkpoints" / "set-aside").exists()
