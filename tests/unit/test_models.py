"""Hugging Face models of three families, LoRA adapters, and the learner's device options, in-process.

learners/model.py (loading), learners/weights.py (what a checkpoint holds, models made from one base),
learners/learner.py (precision, accumulation, compile).
"""

import json
from uuid import uuid4

import numpy as np
import pytest
import safetensors.torch
import torch

from everlearn.errors import CheckpointError, ModelLoadError
from everlearn.learners.checkpoints import CheckpointStore
from everlearn.learners.config import ModelConfig, TrainConfig
from everlearn.learners.learner import ADAPTER, BASE, WEIGHTS, Learner, sequence_losses
from everlearn.learners.model import build_model, build_tokenizer
from everlearn.learners.schedules import ScheduleConfig
from everlearn.learners.weights import Models, full_tensors
from tests.hf_models import FAMILIES, save_tiny

pytestmark = pytest.mark.unit

SEQ, BATCH = 32, 4
SCHED = ScheduleConfig(peak_lr=1e-2, constant_lr=5e-3, min_lr=1e-4, warmup_steps=0, cooldown_steps=0)
TEXT = "def load(path):\n    with open(path) as f:\n        return json.load(f)\n" * 20


def train_cfg(**kw):
    return TrainConfig(seq_len=SEQ, batch_size=BATCH, torch_threads=1, **kw)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: save_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture
def url():
    u = f"memory://models-{uuid4().hex}"
    yield u
    store = CheckpointStore(u)
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


def rows(learner: Learner, text: str = TEXT, n: int = BATCH) -> np.ndarray:
    ids = learner.tokenizer.encode(text)
    assert len(ids) >= n * SEQ
    return ids[: n * SEQ].reshape(n, SEQ)


def lengths(n: int = BATCH) -> np.ndarray:
    return np.full(n, SEQ, dtype=np.int32)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in full_tensors(model).items()}


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_checkpoints_loads_and_resumes(dirs, url, family, lora):
    mcfg = ModelConfig(name_or_path=str(dirs[family]), lora={"r": lora})
    learner = Learner(mcfg, train_cfg(), SCHED, url)
    batch = rows(learner)
    losses = [learner.train_step(batch).loss for _ in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    files = learner.save(learner.step)
    ref = learner.store.commit(learner.step, files)
    assert (ADAPTER in files and BASE in files and WEIGHTS not in files) if lora else (WEIGHTS in files and ADAPTER not in files)

    live = sequence_losses(learner.model, batch, lengths())[0]
    a = learner.train_step(batch)  # the step after the checkpoint (this process's generator as it was saved)

    # the evaluator's and serving's way: a model made from one base and the checkpoint
    loaded = Models(mcfg, build_tokenizer(mcfg)).load(CheckpointStore(url), ref)
    np.testing.assert_allclose(sequence_losses(loaded, batch, lengths())[0], live, rtol=1e-5)

    # a new learner resumes: its next step is the same step, dropout included (the generators are in the checkpoint)
    resumed = Learner(mcfg, train_cfg(), SCHED, url)
    assert resumed.load(ref) == 4
    b = resumed.train_step(batch)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)


def test_tied_weights_are_stored_once_and_stay_tied(dirs, url):
    mcfg = ModelConfig(name_or_path=str(dirs["gpt2"]))
    learner = Learner(mcfg, train_cfg(), SCHED, url)
    learner.train_step(rows(learner))
    ref = learner.store.commit(1, learner.save(1))
    stored = safetensors.torch.load(learner.store.read(ref, WEIGHTS))
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored
    loaded = Models(mcfg, learner.tokenizer).load(learner.store, ref)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, learner.model.lm_head.weight)


def test_a_lora_checkpoint_holds_only_the_adapter_and_names_its_base(dirs, url):
    mcfg = ModelConfig(name_or_path=str(dirs["llama"]), lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    learner = Learner(mcfg, train_cfg(), SCHED, url)
    learner.train_step(rows(learner))
    ref = learner.store.commit(1, learner.save(1))
    adapter = safetensors.torch.load(learner.store.read(ref, ADAPTER))
    assert adapter and all("lora_" in k for k in adapter)
    assert {k.split(".")[-3] for k in adapter} <= {"q_proj", "v_proj"}
    base = json.loads(learner.store.read(ref, BASE))
    assert base["name_or_path"] == str(dirs["llama"]) and base["lora"]["r"] == 2 and len(base["sha256"]) == 64
    n_base = sum(p.numel() for p in build_model(mcfg, learner.tokenizer).parameters())
    assert sum(t.numel() for t in adapter.values()) < n_base / 10
    # only the adapters learn
    assert all(("lora_" in n) == p.requires_grad for n, p in learner.model.named_parameters())


def test_adapters_share_the_base_and_each_model_is_its_own(dirs, url):
    mcfg = ModelConfig(name_or_path=str(dirs["qwen2"]), lora={"r": 4})
    learner = Learner(mcfg, train_cfg(), SCHED, url)
    batch = rows(learner)
    learner.train_step(batch)
    first = learner.store.commit(1, learner.save(1))
    for _ in range(3):
        learner.train_step(batch)
    second = learner.store.commit(4, learner.save(4))
    models = Models(mcfg, learner.tokenizer)
    base_before = weights(models.base)
    m1, m2 = models.load(learner.store, first), models.load(learner.store, second)
    embed = models.base.get_input_embeddings().weight
    assert m1.get_input_embeddings().weight.data_ptr() == embed.data_ptr() == m2.get_input_embeddings().weight.data_ptr()
    l1, l2 = sequence_losses(m1, batch, lengths())[0], sequence_losses(m2, batch, lengths())[0]
    assert l2.sum() < l1.sum()  # different adapters, different models
    np.testing.assert_allclose(sequence_losses(models.load(learner.store, first), batch, lengths())[0], l1, rtol=1e-6)
    for k, v in weights(models.base).items():  # loading adapters left the base as it was
        torch.testing.assert_close(v, base_before[k], rtol=0, atol=0)


def test_an_adapter_is_refused_on_another_base(dirs, url, tmp_path):
    mcfg = ModelConfig(name_or_path=str(dirs["llama"]), lora={"r": 2})
    learner = Learner(mcfg, train_cfg(), SCHED, url)
    learner.train_step(rows(learner))
    ref = learner.store.commit(1, learner.save(1))
    other = ModelConfig(name_or_path=str(save_tiny("llama", tmp_path / "other")), lora={"r": 2})  # same shapes, other weights
    with pytest.raises(CheckpointError, match="was trained on base model .* set model.name_or_path to that base"):
        Models(other, build_tokenizer(other)).load(learner.store, ref)
    with pytest.raises(CheckpointError, match="only applied to its own base"):
        Learner(other, train_cfg(), SCHED, url).load(ref)


def test_full_and_lora_runs_do_not_resume_from_each_other(dirs, url):
    full = ModelConfig(name_or_path=str(dirs["llama"]))
    lora = ModelConfig(name_or_path=str(dirs["llama"]), lora={"r": 2})
    a = Learner(full, train_cfg(), SCHED, url)
    ref_full = a.store.commit(1, a.save(1))
    b = Learner(lora, train_cfg(), SCHED, url)
    ref_lora = b.store.commit(2, b.save(2))
    with pytest.raises(CheckpointError, match="holds full weights but model.lora.r is set"):
        Learner(lora, train_cfg(), SCHED, url).load(ref_full)
    with pytest.raises(CheckpointError, match="holds LoRA adapters but model.lora.r is empty"):
        Learner(full, train_cfg(), SCHED, url).load(ref_lora)
    # serving can still load either kind (a rollback across the switch)
    models = Models(full, build_tokenizer(full))
    assert models.load(a.store, ref_full) is not None and models.load(a.store, ref_lora) is not None


def test_a_directory_s_own_tokenizer_is_used_and_bytes_otherwise(dirs, tmp_path):
    gpt2 = build_tokenizer(ModelConfig(name_or_path=str(dirs["gpt2"])))
    ids = gpt2.encode(TEXT[:200])
    assert len(ids) < 150 and gpt2.decode(ids) == TEXT[:200]  # BPE: fewer ids than bytes, and it round-trips
    bare = save_tiny("llama", tmp_path / "bare", tokenizer=False)
    assert len(build_tokenizer(ModelConfig(name_or_path=str(bare))).encode("abc")) == 3  # bytes


def test_a_model_with_fewer_embeddings_than_the_tokenizer_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 pad_token_id=0, eos_token_id=1, bos_token_id=None)).save_pretrained(tmp_path / "small")
    cfg = ModelConfig(name_or_path=str(tmp_path / "small"))
    with pytest.raises(ModelLoadError, match="tokenizer has .* ids but .* embeds only 100"):
        build_model(cfg, build_tokenizer(cfg))


def test_a_hub_id_without_the_hub_says_how_to_load_from_a_directory(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name_or_path="everlearn-tests/no-such-model")
    with pytest.raises(ModelLoadError, match="save_pretrained the model into a directory"):
        build_model(cfg, build_tokenizer(ModelConfig()))


# -- the learner's device options -------------------------------------------------


def test_gradient_accumulation_takes_the_same_step(url):
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    one, three = Learner(cfg, train_cfg(), SCHED, url), Learner(cfg, train_cfg(grad_accum_steps=3), SCHED, url)
    batch, lens = rows(one), np.array([SEQ, SEQ - 5, 7, SEQ], dtype=np.int32)  # uneven lengths: tokens, not rows, weigh
    for _ in range(3):
        a, b = one.train_step(batch, lens), three.train_step(batch, lens)
        assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.tokens == b.tokens
    for k, v in weights(one.model).items():
        torch.testing.assert_close(weights(three.model)[k], v, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains_close_to_fp32(url):
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    fp32, bf16 = Learner(cfg, train_cfg(), SCHED, url), Learner(cfg, train_cfg(precision="bf16"), SCHED, url)
    assert not fp32.bf16 and bf16.bf16 and fp32.device.type == "cpu"
    batch = rows(fp32)
    for _ in range(3):
        a, b = fp32.train_step(batch), bf16.train_step(batch)
        assert b.loss == pytest.approx(a.loss, rel=2e-2)  # bf16 keeps ~3 significant digits
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # weights and optimizer stay float32


def test_a_compiled_learner_writes_the_checkpoint_an_uncompiled_one_reads(url):
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    plain, compiled = Learner(cfg, train_cfg(), SCHED, url), Learner(cfg, train_cfg(compile=True, compile_backend="eager"), SCHED, url)
    assert compiled.net is not compiled.model
    batch = rows(plain)
    for _ in range(2):
        assert compiled.train_step(batch).loss == pytest.approx(plain.train_step(batch).loss, rel=1e-5)
    ref = compiled.store.commit(2, compiled.save(2))
    assert not any("_orig_mod" in k for k in safetensors.torch.load(compiled.store.read(ref, WEIGHTS)))
    fresh = Learner(cfg, train_cfg(), SCHED, url)
    fresh.load(ref)
    assert fresh.train_step(batch).loss == pytest.approx(plain.train_step(batch).loss, rel=1e-5)


def test_sdpa_and_eager_attention_agree(url):
    base = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
    sdpa = Learner(ModelConfig(**base), train_cfg(), SCHED, url)
    eager = Learner(ModelConfig(**base, attn_implementation="eager"), train_cfg(), SCHED, url)
    assert sdpa.model.config._attn_implementation == "sdpa" and eager.model.config._attn_implementation == "eager"
    batch, lens = rows(sdpa), np.array([SEQ, 9, SEQ, 3], dtype=np.int32)
    assert sdpa.train_step(batch, lens).loss == pytest.approx(eager.train_step(batch, lens).loss, rel=1e-5)


def test_cuda_asked_for_without_a_gpu_says_so(url):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError, match="train.device=cuda but no CUDA GPU is visible"):
        Learner(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), train_cfg(device="cuda"), SCHED, url)


def test_a_tokenizer_that_yields_no_tokens_is_refused(tmp_path):
    from transformers import ByT5Tokenizer

    # transformers 5 picks the tokenizer class by the model's type: a Qwen2 directory with ByT5's files
    # gets a Qwen2Tokenizer without a vocabulary, which turns every text into nothing
    path = save_tiny("qwen2", tmp_path / "q", tokenizer=False)
    ByT5Tokenizer().save_pretrained(path)
    with pytest.raises(ModelLoadError, match="turns text into no tokens"):
        build_tokenizer(ModelConfig(name_or_path=str(path)))
