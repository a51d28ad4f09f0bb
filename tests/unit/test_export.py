"""``everlearn export``: checkpoints out as save_pretrained directories that transformers and peft load."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from everlearn.daemon.cli import main
from everlearn.learners.checkpoints import CheckpointStore
from everlearn.learners.config import ModelConfig, TrainConfig
from everlearn.learners.learner import Learner, sequence_losses
from everlearn.learners.model import build_tokenizer
from everlearn.learners.schedules import ScheduleConfig
from everlearn.learners.weights import Models
from tests.hf_models import save_tiny

pytestmark = pytest.mark.unit
SEQ = 32
SCHED = ScheduleConfig(peak_lr=1e-2, constant_lr=5e-3, min_lr=1e-4, warmup_steps=0, cooldown_steps=0)


def run_with_checkpoints(tmp_path, lora):
    base = save_tiny("llama", tmp_path / "base")
    mcfg = ModelConfig(name_or_path=str(base), lora={"r": lora})
    store_dir = tmp_path / "run" / "checkpoints"
    learner = Learner(mcfg, TrainConfig(seq_len=SEQ, batch_size=4, torch_threads=1), SCHED, str(store_dir))
    batch = learner.tokenizer.encode("import json\nprint(json.dumps({'a': 1}))\n" * 10)[: 4 * SEQ].reshape(4, SEQ)
    for _ in range(3):
        learner.train_step(batch)
    ref = learner.store.commit(3, learner.save(3))
    sets = ["--set", f"run_dir={tmp_path / 'run'}", "--set", f"model.name_or_path={base}"]
    if lora:
        sets += ["--set", f"model.lora.r={lora}"]
    return mcfg, ref, batch, sets


def losses(model, batch):
    return sequence_losses(model, batch, np.full(len(batch), SEQ))[0]


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_exported_directory_loads_with_transformers_and_scores_like_the_checkpoint(tmp_path, capsys, lora):
    mcfg, ref, batch, sets = run_with_checkpoints(tmp_path, lora)
    expected = losses(Models(mcfg, build_tokenizer(mcfg)).load(CheckpointStore(ref.store_url), ref), batch)
    out = tmp_path / "exported"
    assert main(["export", *sets, "3", str(out), *(["--merged"] if lora else [])]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["kind"] == ("merged" if lora else "full") and written["manifest_sha256"] == ref.manifest_sha256
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(losses(model, batch), expected, rtol=1e-5)
    # the directory is a model everlearn itself can start from, with its tokenizer
    again = ModelConfig(name_or_path=str(out))
    assert build_tokenizer(again).encode("abc").tolist() == build_tokenizer(mcfg).encode("abc").tolist()
    assert json.loads((out / "everlearn.json").read_text())["step"] == 3


@pytest.mark.filterwarnings("ignore:.is_gradient_checkpointing. is deprecated:FutureWarning")  # peft 0.21 asks transformers 5
def test_an_unmerged_lora_export_is_a_peft_adapter(tmp_path, capsys):
    from peft import PeftModel

    mcfg, ref, batch, sets = run_with_checkpoints(tmp_path, 4)
    expected = losses(Models(mcfg, build_tokenizer(mcfg)).load(CheckpointStore(ref.store_url), ref), batch)
    assert main(["export", *sets, "latest", str(tmp_path / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "adapter"
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    np.testing.assert_allclose(losses(PeftModel.from_pretrained(base, tmp_path / "adapter"), batch), expected, rtol=1e-5)


def test_export_refuses_a_full_directory_and_an_unknown_step(tmp_path, capsys):
    _, _, _, sets = run_with_checkpoints(tmp_path, None)
    full = tmp_path / "taken"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["export", *sets, "3", str(full)]) == 2
    assert "is not empty" in capsys.readouterr().err and (full / "keep.txt").exists()
    assert main(["export", *sets, "7", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no committed checkpoint of step 7" in err and "[3]" in err and not (tmp_path / "x").exists()
    assert main(["export", *sets, "served", str(tmp_path / "y")]) == 2
    assert "nothing was served yet" in capsys.readouterr().err
