"""The Learner (learners/learner.py) in-process, and the model/tokenizer builders (learners/model.py)."""

import math
import warnings
from uuid import uuid4

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ByT5Tokenizer

from everlearn import failpoints
from everlearn.deploy.evaluator import Evaluator
from everlearn.errors import CheckpointCorruptError, ModelLoadError, NonFiniteError
from everlearn.learners.checkpoints import CheckpointStore
from everlearn.learners.config import TrainConfig
from everlearn.learners.learner import (
    LEARNER_STATE,
    OPTIMIZER,
    RNG,
    WEIGHTS,
    Learner,
    token_losses,
)
from everlearn.learners.model import ModelConfig, Tokenizer, build_model, build_tokenizer
from everlearn.learners.schedules import ScheduleConfig
from everlearn.learners.weights import load_into

pytestmark = pytest.mark.unit


SEQ_LEN, BATCH = 16, 4
PEAK, CONST, MIN, W, C = 1e-2, 5e-3, 1e-4, 4, 10


def model_cfg(**kw):
    base = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
    return ModelConfig(**(base | kw))


TRAIN = TrainConfig(seq_len=SEQ_LEN, batch_size=BATCH, torch_threads=1, eval_batch_size=3)
SCHED = ScheduleConfig(peak_lr=PEAK, constant_lr=CONST, min_lr=MIN, warmup_steps=W, cooldown_steps=C, anneal_steps=5)


@pytest.fixture
def store_url():
    url = f"memory://t-{uuid4().hex}"
    yield url
    store = CheckpointStore(url)
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


def new_learner(url, mcfg=None):
    return Learner(mcfg or model_cfg(), TRAIN, SCHED, url)


def batch(seed=0, n=BATCH):
    return np.random.default_rng(seed).integers(3, 259, size=(n, SEQ_LEN)).astype(np.int32)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def manual_mean_loss(model, tokens, lengths):
    """Mean next-token cross entropy, each sequence run on its own without padding."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row, n in zip(tokens, lengths, strict=True):
            if n < 2:
                continue
            ids = torch.tensor(row[:n], dtype=torch.long)[None]
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += n - 1
    model.train(was)
    return total / count


# -- training --------------------------------------------------------------------


def test_train_step_emits_no_warning(store_url):
    learner = new_learner(store_url)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.train_step(batch())


def test_loss_falls_on_a_repeated_batch(store_url):
    learner = new_learner(store_url)
    tokens = batch()
    losses = [learner.train_step(tokens).loss for _ in range(30)]
    # an untrained model is near-uniform over the vocabulary
    assert losses[0] == pytest.approx(math.log(learner.tokenizer.vocab_size), abs=0.3)
    assert losses[-1] < 0.5 * losses[0]
    assert all(math.isfinite(x) for x in losses)
    assert learner.step == 30


def test_step_stats_match_an_independent_loss(store_url):
    learner = new_learner(store_url)
    for _ in range(W + 1):  # leave the zero-LR first step behind
        learner.train_step(batch(1))
    tokens = batch(2)
    lengths = np.array([16, 9, 2, 12], dtype=np.int32)
    tokens[1, 9:] = 0
    tokens[2, 2:] = 0
    tokens[3, 12:] = 0
    expected = manual_mean_loss(learner.model, tokens, lengths)
    stats = learner.train_step(tokens, lengths)
    assert stats.loss == pytest.approx(expected, rel=1e-5)
    assert stats.tokens == int((lengths - 1).sum())
    assert stats.step == W + 2
    assert stats.grad_norm > 0 and stats.seconds > 0
    assert stats.to_dict()["step"] == W + 2


def test_lr_follows_the_schedule(store_url):
    learner = new_learner(store_url)
    start = weights(learner.model)
    lrs = []
    for i in range(W + C + 3):
        stats = learner.train_step(batch(i))
        lrs.append(stats.lr)
        assert learner.optimizer.param_groups[0]["lr"] == stats.lr
        if i == 0:
            # the first step runs at LR 0: AdamW (weight decay included) must not move a weight
            assert_same_weights(weights(learner.model), start)
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(PEAK / W)
    assert lrs[W // 2] == pytest.approx(PEAK / 2)
    assert lrs[W] == pytest.approx(PEAK)
    assert lrs[W + C // 2] == pytest.approx((PEAK + CONST) / 2)
    assert lrs[W + C] == pytest.approx(CONST)
    assert lrs[W + C + 2] == pytest.approx(CONST)


def test_lr_follows_an_anneal_anchor(store_url):
    learner = new_learner(store_url)
    learner.schedule.anneal_start = W + C
    lrs = [learner.train_step(batch()).lr for _ in range(W + C + 8)]
    assert lrs[W + C] == pytest.approx(CONST)
    assert lrs[W + C + 5] == pytest.approx(MIN)
    assert lrs[W + C + 7] == pytest.approx(MIN)


def test_same_config_same_initial_weights(store_url):
    a, b = new_learner(store_url), new_learner(store_url)
    assert_same_weights(weights(a.model), weights(b.model))
    c = new_learner(store_url, model_cfg(seed=1))
    assert not torch.equal(a.model.model.embed_tokens.weight, c.model.model.embed_tokens.weight)


# -- checkpoints -----------------------------------------------------------------


def optimizer_state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for name in sa["state"][k]:
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), (k, name)


def test_save_and_load_restore_weights_optimizer_and_step(store_url):
    a = new_learner(store_url)
    for i in range(7):
        a.train_step(batch(i))
    a.schedule.anneal_start = 100
    files = a.save(a.step)
    assert set(files) == {WEIGHTS, OPTIMIZER, LEARNER_STATE, RNG}
    ref = a.store.commit(a.step, files)

    b = new_learner(store_url)  # a fresh process would start from the initial weights
    assert not torch.equal(weights(a.model)["lm_head.weight"], weights(b.model)["lm_head.weight"])
    assert b.load(ref) == 7
    assert b.step == 7
    assert b.schedule.anneal_start == 100
    assert_same_weights(weights(a.model), weights(b.model))
    optimizer_state_equal(a.optimizer, b.optimizer)

    for i in range(3):
        sa, sb = a.train_step(batch(100 + i)), b.train_step(batch(100 + i))
        assert sa.step == sb.step == 8 + i
        assert sa.lr == sb.lr
        assert sa.loss == pytest.approx(sb.loss, rel=1e-6, abs=1e-7)
    for (ka, va), (kb, vb) in zip(weights(a.model).items(), weights(b.model).items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-7)


def test_load_refuses_a_corrupted_checkpoint(store_url):
    a = new_learner(store_url)
    a.train_step(batch())
    ref = a.store.commit(a.step, a.save(a.step))
    path = f"{a.store.root}/{ref.name}/{WEIGHTS}"
    data = bytearray(a.store.fs.cat_file(path))
    data[-1] ^= 0x01
    a.store.fs.pipe_file(path, bytes(data))
    b = new_learner(store_url)
    before = weights(b.model)
    with pytest.raises(CheckpointCorruptError):
        b.load(ref)
    assert_same_weights(weights(b.model), before)
    assert b.step == 0


def test_evaluate_a_checkpoint_equals_the_live_model_at_save_time(store_url):
    learner = new_learner(store_url)
    for i in range(6):
        learner.train_step(batch(i))
    ev_tokens = batch(50, n=5)
    ev_lengths = np.array([16, 5, 16, 11, 8], dtype=np.int32)
    for row, n in zip(ev_tokens, ev_lengths, strict=True):
        row[n:] = 0
    at_save = learner.evaluate(ev_tokens, ev_lengths)
    assert at_save == pytest.approx(manual_mean_loss(learner.model, ev_tokens, ev_lengths), rel=1e-5)
    ref6 = learner.store.commit(learner.step, learner.save(learner.step))

    for i in range(6):
        learner.train_step(batch(i))
    live = learner.evaluate(ev_tokens, ev_lengths)
    assert abs(live - at_save) > 1e-3  # training moved on
    # the judge's evaluator holds the checkpoints' models; the learner holds only its own
    evaluator = Evaluator(model_cfg(), torch_threads=1, batch_size=3, cache=2)
    assert evaluator.loss(ref6, ev_tokens, ev_lengths) == pytest.approx(at_save, rel=1e-6, abs=1e-7)

    # a second checkpoint is evaluated with its own weights, and the first still with its own
    ref12 = learner.store.commit(learner.step, learner.save(learner.step))
    assert evaluator.loss(ref12, ev_tokens, ev_lengths) == pytest.approx(live, rel=1e-6, abs=1e-7)
    assert evaluator.loss(ref6, ev_tokens, ev_lengths) == pytest.approx(at_save, rel=1e-6, abs=1e-7)
    assert len(evaluator._models) == 2
    # evaluating never changes the live model's mode
    assert learner.model.training


def test_the_evaluator_scores_each_sequence_once_per_model_and_gives_the_same_losses(store_url):
    learner = new_learner(store_url)
    for i in range(3):
        learner.train_step(batch(i))
    ref = learner.store.commit(learner.step, learner.save(learner.step))
    tokens = batch(60, n=6)
    lengths = np.array([16, 3, 16, 9, 1, 12], dtype=np.int32)
    tokens[1, 3:] = 7  # what lies past a sequence's length is not part of it
    evaluator = Evaluator(model_cfg(), torch_threads=1, batch_size=4, cache=2)
    first = evaluator.loss(ref, tokens, lengths)
    assert first == pytest.approx(manual_mean_loss(learner.model, tokens, lengths), rel=1e-5)
    assert (evaluator.scored, evaluator.reused) == (6, 0)
    # a window that slid by two sequences: only the new ones run through the model
    slid = np.concatenate([tokens[2:], batch(61, n=2)])
    slid_lengths = np.concatenate([lengths[2:], np.array([16, 10], dtype=np.int32)])
    slid[1, 9:] = 0  # the same sequence (tokens[3], length 9) with other padding
    assert evaluator.loss(ref, slid, slid_lengths) == pytest.approx(manual_mean_loss(learner.model, slid, slid_lengths), rel=1e-5)
    assert (evaluator.scored, evaluator.reused) == (8, 4)
    assert evaluator.loss(ref, tokens, lengths) == first
    # scores go with their model: evicted with it, recomputed after
    for i in range(2):
        learner.train_step(batch(i))
        evaluator.loss(learner.store.commit(learner.step, learner.save(learner.step)), tokens, lengths)
    assert ref.manifest_sha256 not in evaluator._scores and len(evaluator._scores) == 2
    before = evaluator.scored
    assert evaluator.loss(ref, tokens, lengths) == pytest.approx(first, rel=1e-6)
    assert evaluator.scored == before + 6


def _optimizer_state(learner):
    return {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in st.items()} for k, st in learner.optimizer.state.items()}


def test_a_nan_loss_skips_the_step_and_leaves_weights_optimizer_and_step_untouched(store_url, monkeypatch):
    learner = new_learner(store_url)
    learner.train_step(batch(0))
    before, opt_before, step = weights(learner.model), _optimizer_state(learner), learner.step
    failpoints.reload("learner.loss@1=nan")
    try:
        stats = learner.train_step(batch(1))
    finally:
        failpoints.reload("")
    assert stats.skipped and "non-finite loss" in stats.skipped and math.isnan(stats.loss)
    assert stats.step == step == learner.step
    assert_same_weights(weights(learner.model), before)
    after = _optimizer_state(learner)
    assert after.keys() == opt_before.keys()
    for k in after:
        for n in after[k]:
            assert torch.equal(torch.as_tensor(after[k][n]), torch.as_tensor(opt_before[k][n]))
    assert all(p.grad is None for p in learner.model.parameters())
    # the next step trains as usual
    assert learner.train_step(batch(2)).skipped is None and learner.step == step + 1


def test_an_infinite_gradient_with_a_finite_loss_skips_the_step(store_url):
    learner = new_learner(store_url)
    before = weights(learner.model)
    param = next(learner.model.parameters())
    handle = param.register_hook(lambda g: g * float("inf"))
    try:
        stats = learner.train_step(batch(0))
    finally:
        handle.remove()
    assert math.isfinite(stats.loss) and stats.skipped and "gradient" in stats.skipped
    assert learner.step == 0
    assert_same_weights(weights(learner.model), before)


def test_non_finite_weights_are_never_checkpointed(store_url):
    learner = new_learner(store_url)
    with torch.no_grad():
        next(learner.model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        learner.save(0)
    assert not CheckpointStore(store_url).fs.exists(f"{CheckpointStore(store_url).root}/step-000000000/{WEIGHTS}")


def test_evaluate_ignores_what_lies_beyond_each_length(store_url):
    learner = new_learner(store_url)
    tokens = batch(3, n=4)
    lengths = np.array([16, 7, 3, 12], dtype=np.int32)
    clean = tokens.copy()
    for row, n in zip(clean, lengths, strict=True):
        row[n:] = 0
    garbage = tokens  # same prefixes, random tokens after each length
    assert learner.evaluate(garbage, lengths) == pytest.approx(learner.evaluate(clean, lengths), rel=1e-5)
    assert learner.evaluate(clean, lengths) == pytest.approx(manual_mean_loss(learner.model, clean, lengths), rel=1e-5)


def test_evaluate_nothing_is_nan(store_url):
    learner = new_learner(store_url)
    assert math.isnan(learner.evaluate(np.zeros((0, SEQ_LEN), dtype=np.int32), np.zeros(0, dtype=np.int32)))


def test_token_losses_counts_predicted_tokens(store_url):
    learner = new_learner(store_url)
    tokens = batch(4, n=3)
    lengths = np.array([16, 1, 10], dtype=np.int32)
    total, count = token_losses(learner.model, tokens, lengths, batch_size=2)
    assert count == 15 + 0 + 9
    assert total / count == pytest.approx(manual_mean_loss(learner.model, tokens, lengths), rel=1e-5)


def test_load_into_a_built_model(store_url):
    learner = new_learner(store_url)
    learner.train_step(batch())
    learner.train_step(batch())
    ref = learner.store.commit(learner.step, learner.save(learner.step))
    model = build_model(model_cfg(), learner.tokenizer)
    load_into(model, CheckpointStore(store_url), ref)
    assert_same_weights(weights(model), weights(learner.model))


# -- model and tokenizer ---------------------------------------------------------


def test_build_model_from_a_save_pretrained_directory(tmp_path):
    tok = build_tokenizer(model_cfg())
    original = build_model(model_cfg(seed=7), tok)
    original.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"))
    loaded = build_model(cfg, build_tokenizer(cfg))
    assert type(loaded) is type(original)
    assert next(loaded.parameters()).dtype == torch.float32
    assert_same_weights(weights(loaded), weights(original))
    assert loaded.config.hidden_size == 32 and loaded.config.num_hidden_layers == 1


def test_learner_starts_from_a_save_pretrained_directory(tmp_path, store_url):
    tok = build_tokenizer(model_cfg())
    original = build_model(model_cfg(seed=3), tok)
    original.save_pretrained(tmp_path / "m")
    learner = Learner(ModelConfig(name_or_path=str(tmp_path / "m")), TRAIN, SCHED, store_url)
    assert_same_weights(weights(learner.model), weights(original))
    assert learner.model.training
    assert math.isfinite(learner.train_step(batch()).loss)


def test_directory_without_config_raises_model_load_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"not really")
    with pytest.raises(ModelLoadError, match="config.json"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "empty")), build_tokenizer(model_cfg()))
    with pytest.raises(ModelLoadError):
        build_model(ModelConfig(name_or_path=str(tmp_path / "missing")), build_tokenizer(model_cfg()))


def test_heads_must_divide_hidden_size():
    with pytest.raises(ModelLoadError, match="divisible"):
        build_model(model_cfg(hidden_size=30, num_heads=4), build_tokenizer(model_cfg()))


def test_built_model_matches_config():
    tok = build_tokenizer(model_cfg())
    model = build_model(model_cfg(), tok)
    assert model.config.vocab_size == tok.vocab_size == 384  # ByT5: 3 specials + 256 bytes + 125 extra ids
    assert model.config.hidden_size == 32
    assert model.config.num_hidden_layers == 1
    assert model.config.num_attention_heads == 2
    assert model.config.intermediate_size == 64
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    assert model.training


TEXTS = [
    "Hello, world! 0123456789 ~`!@#$%^&*()",
    "line one\nline two\ttabbed\r\n",
    "naïve café — Grüße, Ελληνικά, русский",
    "日本語のテキスト 🙂🚀 emoji and CJK",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_fast_path_equals_byt5_tokenizer(text):
    hf = ByT5Tokenizer()
    tok = Tokenizer(hf)
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == hf(text, add_special_tokens=False)["input_ids"]
    # independent of both: byte b is id b + 3
    assert ids.tolist() == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text


def test_decode_skips_pad_and_eos():
    tok = build_tokenizer(model_cfg())
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    ids = np.concatenate([tok.encode("héllo"), [tok.eos_id], tok.encode(" wörld"), [tok.pad_id, tok.pad_id]])
    assert tok.decode(ids) == "héllo wörld"


def test_special_token_text_stays_plain_bytes():
    # a document that literally contains "</s>" must not smuggle an EOS into the stream
    tok = build_tokenizer(model_cfg())
    ids = tok.encode("a</s>b<pad>")
    assert tok.eos_id not in ids.tolist() and tok.pad_id not in ids.tolist()
    assert tok.decode(ids) == "a</s>b<pad>"
