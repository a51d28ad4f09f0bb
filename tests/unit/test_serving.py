"""The serving replica in-process: loading promoted versions and answering requests (no Ray)."""

import asyncio
import json
import os

import numpy as np
import pytest
import torch
from starlette.requests import Request

from everlearn.deploy.deployment import deploy_config
from everlearn.deploy.serve_config import ServeConfig
from everlearn.deploy.serving import build_app
from everlearn.errors import ServingError
from everlearn.learners import CheckpointStore, Learner, ModelConfig, ScheduleConfig, TrainConfig
from everlearn.learners.learner import weights_bytes

pytestmark = pytest.mark.unit

MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)


def _request(method: str, path: str, body: bytes = b"") -> Request:
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b"", "root_path": "",
             "scheme": "http", "server": ("127.0.0.1", 8000)}
    return Request(scope, receive)


def _call(server, method: str, path: str, body=None) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    resp = asyncio.run(server(_request(method, path, raw)))
    return resp.status_code, json.loads(resp.body)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()  # a replica sets its own thread count; give the rest of the suite its own back
    yield
    torch.set_num_threads(n)


@pytest.fixture
def trained(tmp_path):
    """A store with two committed checkpoints: step 0 (initial) and step 5 (trained)."""
    url = str(tmp_path / "ckpt")
    learner = Learner(MODEL, TrainConfig(seq_len=16, batch_size=4, torch_threads=1), ScheduleConfig(warmup_steps=1, cooldown_steps=1, peak_lr=1e-2, constant_lr=1e-2, min_lr=1e-3), url)
    store = CheckpointStore(url)
    ref0 = store.commit(0, learner.save(0))
    tokens = np.tile((np.arange(16, dtype=np.int32) % 5) + 100, (4, 1))
    for _ in range(5):
        learner.train_step(tokens)
    ref5 = store.commit(5, learner.save(5))
    return store, ref0, ref5, learner


def _server():
    app = build_app({"model": MODEL.model_dump(), "storage_options": {}, "torch_threads": 1})
    cls = app._bound_deployment.func_or_class
    return cls(MODEL.model_dump(), {}, 1)


def test_not_ready_before_a_version_is_loaded():
    server = _server()
    assert _call(server, "GET", "/healthz")[0] == 503
    assert _call(server, "GET", "/version")[0] == 503


def test_reconfigure_swaps_to_the_promoted_weights(trained):
    store, ref0, ref5, learner = trained
    server = _server()
    server.reconfigure({"version": 0, **ref0.to_dict()})
    assert _call(server, "GET", "/version") == (200, {"version": 0, "step": 0, "checkpoint": ref0.uri,
                                                      "manifest_sha256": ref0.manifest_sha256, "promoted_unix": None,
                                                      "replica_pid": os.getpid()})
    text = "".join(chr(97 + (i % 5)) for i in range(15))  # bytes 97..101 = ids 100..104: what the learner saw
    loss0 = _call(server, "POST", "/score", {"text": text})[1]["loss"]
    server.reconfigure({"version": 1, **ref5.to_dict()})
    code, answer = _call(server, "POST", "/score", {"text": text})
    assert code == 200 and answer["version"] == 1
    assert answer["loss"] < loss0 - 0.5
    # the replica holds exactly the promoted bytes
    served = server.loaded.model
    assert weights_bytes(served) == store.read(ref5, "model.safetensors")
    # the same version again is a no-op (no reload)
    before = server.loaded
    server.reconfigure({"version": 1, **ref5.to_dict()})
    assert server.loaded is before


def test_a_damaged_checkpoint_is_refused_and_serving_keeps_its_version(trained, tmp_path):
    store, ref0, ref5, _ = trained
    server = _server()
    server.reconfigure({"version": 0, **ref0.to_dict()})
    path = tmp_path / "ckpt" / ref5.name / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ServingError, match="sha256"):
        server.reconfigure({"version": 1, **ref5.to_dict()})
    assert _call(server, "GET", "/version")[1]["version"] == 0


def test_generate_and_bad_requests(trained):
    _, ref0, _, _ = trained
    server = _server()
    server.reconfigure({"version": 0, **ref0.to_dict()})
    code, answer = _call(server, "POST", "/generate", {"prompt": "ab", "max_new_tokens": 5})
    assert code == 200 and isinstance(answer["text"], str) and answer["version"] == 0
    code, sampled = _call(server, "POST", "/generate", {"prompt": "ab", "max_new_tokens": 5, "temperature": 1.0, "seed": 3})
    assert code == 200 and sampled == _call(server, "POST", "/generate", {"prompt": "ab", "max_new_tokens": 5, "temperature": 1.0, "seed": 3})[1]
    assert _call(server, "POST", "/generate", b"{nope")[0] == 400
    assert _call(server, "POST", "/generate", [1, 2])[0] == 400
    assert _call(server, "POST", "/generate", {"prompt": 3})[0] == 400
    assert _call(server, "POST", "/generate", {"max_new_tokens": 10_000})[0] == 400
    assert _call(server, "POST", "/score", {"text": ""})[0] == 400
    assert _call(server, "POST", "/score", {"text": "a"})[0] == 400  # nothing to predict
    code, answer = _call(server, "GET", "/nowhere")
    assert code == 404 and "/generate" in answer["error"]


def test_score_covers_text_longer_than_the_context(trained):
    _, ref0, _, _ = trained
    server = _server()
    server.reconfigure({"version": 0, **ref0.to_dict()})
    code, answer = _call(server, "POST", "/score", {"text": "x" * 200})  # > max_position_embeddings=64
    assert code == 200 and answer["tokens"] == 200 - 4  # 4 chunks of <= 64, each predicts all but its first token


def test_declarative_config_changes_only_user_config_between_versions():
    a = deploy_config(MODEL, ServeConfig(port=8123), {"version": 1, "uri": "file:///x/step-1"})
    b = deploy_config(MODEL, ServeConfig(port=8123), {"version": 2, "uri": "file:///x/step-2"})
    assert a["http_options"] == {"host": "127.0.0.1", "port": 8123}
    da, db = a["applications"][0].pop("deployments")[0], b["applications"][0].pop("deployments")[0]
    assert a == b  # import path, args, runtime: byte-identical, so replicas are reconfigured, not replaced
    assert da.pop("user_config") != db.pop("user_config") and da == db


# -- request validation, decoding and scoring --------------------------------------------------------------


@pytest.fixture
def ready():
    """A replica serving version 0 with the built (untrained) weights: no checkpoint store needed."""
    server = _server()
    server.reconfigure({"version": 0})
    return server


def _raw(text: str) -> bytes:
    return text.encode()


def _field_cases(field: str, values: tuple[str, ...], base: str = "") -> list:
    """One raw-JSON body per value of ``field`` (``base`` holds other fields that make the field matter)."""
    return [pytest.param(f'{{{base}"{field}": {v}}}', field, id=f"{field}={v[:24]}") for v in values]


BAD_GENERATE = [  # (raw JSON body, the field the message must name)
    *_field_cases("prompt", ("3", "null", "true", '["a"]', '{"a": 1}', '"\\ud800"')),  # a lone surrogate: valid JSON, no UTF-8 form
    *_field_cases("max_new_tokens", ('"5"', "5.0", "true", "null", "0", "-1", "513", "1e999", "NaN", "1" + "0" * 30)),
    *_field_cases("temperature", ('"1"', "true", "null", "-0.5", "-1", "10.5", "NaN", "Infinity", "-Infinity", "1e999", "[1]")),
    *_field_cases("top_k", ('"5"', "true", "2.5", "0", "-3", "385", "null", "Infinity"), base='"temperature": 1, '),  # vocab: 384
    *_field_cases("seed", ('"1"', "true", "false", "1.5", "-1", str(2**64), "NaN", "{}"), base='"temperature": 1, '),
    pytest.param('{"prompt": "a", "top_p": 0.9}', "top_p", id="extra field top_p"),
    pytest.param('{"prompt": "a", "max_tokens": 5}', "max_tokens", id="extra field max_tokens"),
    pytest.param('{"prompt": "' + "a" * 100_001 + '"}', "prompt", id="prompt over MAX_PROMPT_CHARS"),
    pytest.param('{"prompt": "' + "a" * 60 + '", "max_new_tokens": 5}', "prompt", id="60+5 tokens over the 64-token context"),
    pytest.param('{"prompt": "' + "a" * 70 + '", "max_new_tokens": 1}', "prompt", id="prompt alone over the context"),
    pytest.param('{"prompt": "ab", "max_new_tokens": 64}', "max_new_tokens", id="2+64 tokens over the context"),
]

BAD_SCORE = [
    *_field_cases("text", ('""', "3", "null", "true", '["x"]', '{"t": "x"}', "NaN", '"\\udfff\\ud800"')),
    pytest.param("{}", "text", id="text missing"),
    pytest.param("", "text", id="empty body: text still required"),
    pytest.param('{"text": "ab", "prompt": "x"}', "prompt", id="extra field prompt"),
    pytest.param('{"text": "' + "a" * 1_000_001 + '"}', "text", id="text over MAX_SCORE_CHARS"),
    pytest.param('{"text": "a"}', "text", id="one token predicts nothing"),
]

BAD_BODIES = [
    b"{nope", b"[1, 2]", b'"prompt"', b"3", b"null", b"true", b" ", b"{} {}",
    b"\xff\xfe{}", b'{"prompt": "caf\xe9"}',  # not UTF-8
    b"[" * 100_000,  # nesting deeper than the parser recurses
    b'{"seed": 1' + b"0" * 5000 + b"}",  # an integer longer than Python parses
]


@pytest.mark.parametrize(("body", "field"), BAD_GENERATE)
def test_generate_refuses_bad_fields_with_400_naming_the_field(ready, body, field):
    code, answer = _call(ready, "POST", "/generate", _raw(body))
    assert code == 400, answer
    assert set(answer) == {"error"} and f"'{field}'" in answer["error"], answer


@pytest.mark.parametrize(("body", "field"), BAD_SCORE)
def test_score_refuses_bad_fields_with_400_naming_the_field(ready, body, field):
    code, answer = _call(ready, "POST", "/score", _raw(body))
    assert code == 400, answer
    assert set(answer) == {"error"} and f"'{field}'" in answer["error"], answer


@pytest.mark.parametrize("path", ["/generate", "/score"])
@pytest.mark.parametrize("body", BAD_BODIES, ids=lambda b: repr(b[:20]))
def test_bodies_that_are_not_a_utf8_json_object_get_400(ready, path, body):
    code, answer = _call(ready, "POST", path, body)
    assert code == 400, answer
    assert "request body" in answer["error"] and "{" in answer["error"], answer  # says what a body looks like


def test_validation_messages_say_what_is_allowed(ready):
    error = _call(ready, "POST", "/generate", {"max_new_tokens": True})[1]["error"]
    assert error == "'max_new_tokens': Input should be a valid integer, got boolean (allowed: an integer from 1 to 512)"
    error = _call(ready, "POST", "/generate", _raw('{"temperature": NaN}'))[1]["error"]
    assert error.startswith("'temperature': Input should be a finite number, got nan (allowed: a finite number from 0")
    error = _call(ready, "POST", "/generate", {"temperature": 1, "top_k": 385})[1]["error"]
    assert "top_k=385 is more than the model's vocabulary of 384 tokens" in error
    error = _call(ready, "POST", "/generate", {"prompt": "a", "top_p": 0.9})[1]["error"]
    assert error == "unknown field 'top_p'; the fields are: prompt, max_new_tokens, temperature, top_k, seed"
    error = _call(ready, "POST", "/generate", {"prompt": "ab", "max_new_tokens": 64})[1]["error"]
    assert "more than the model's context of 64 tokens" in error and "at most 62 new tokens" in error
    error = _call(ready, "POST", "/generate", {"prompt": "a" * 64, "max_new_tokens": 1})[1]["error"]
    assert error.startswith("'prompt' is 64 tokens: it fills the model's context of 64 tokens")
    error = _call(ready, "POST", "/generate", {"seed": -1, "top_k": 0})[1]["error"]  # every problem, not only the first
    assert "'top_k'" in error and "'seed'" in error
    assert _call(ready, "POST", "/score", b"")[1]["error"].startswith("'text' is required (allowed: a non-empty string")


def test_values_at_the_limits_are_accepted(ready):
    ok = [{"prompt": "", "max_new_tokens": 1}, {"prompt": "a" * 63, "max_new_tokens": 1}, {"prompt": "a", "max_new_tokens": 63},
          {"max_new_tokens": 3, "temperature": 10, "top_k": 384, "seed": 2**64 - 1}, {"max_new_tokens": 3, "temperature": 1e-3, "top_k": 1, "seed": 0},
          {"max_new_tokens": 3, "temperature": 0.5, "seed": None}, {"max_new_tokens": 3, "temperature": 1}]  # an integer temperature is a number
    for body in ok:
        code, answer = _call(ready, "POST", "/generate", body)
        assert code == 200 and set(answer) == {"text", "version"}, (body, answer)
    code, answer = _call(ready, "POST", "/score", {"text": "ab"})
    assert code == 200 and set(answer) == {"loss", "tokens", "version"} and answer["tokens"] == 1


def test_no_field_value_reaches_the_internal_error_path(ready):
    """Every JSON kind in every field answers 200 or 400: bad input never shows up as a 500."""
    values = ["null", "true", "false", "0", "-1", "1", "2", "63", "385", str(2**64), "1.5", "-0.0", "1e-320", "NaN", "-Infinity", "1e999",
              '""', '"x"', '"\\u0000"', '"\\ud800"', "[]", "{}", '[{"a": null}]']
    for path, fields in (("/generate", ["prompt", "max_new_tokens", "temperature", "top_k", "seed"]), ("/score", ["text"])):
        for field in fields:
            for value in values:
                extra = '"max_new_tokens": 2, ' if field != "max_new_tokens" and path == "/generate" else ""
                code, answer = _call(ready, "POST", path, _raw(f'{{{extra}"{field}": {value}}}'))
                assert code in (200, 400), (path, field, value, answer)


def test_an_unexpected_failure_answers_500_and_the_replica_keeps_serving(ready, monkeypatch, caplog):
    from everlearn.deploy import serving

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(serving, "decode", broken)
    code, answer = _call(ready, "POST", "/generate", {"prompt": "ab", "max_new_tokens": 2})
    assert code == 500 and set(answer) == {"error"} and "RuntimeError" in answer["error"]
    assert "boom" in caplog.text  # the traceback is in the log, not in the answer
    assert _call(ready, "GET", "/healthz") == (200, {"ok": True})
    assert _call(ready, "POST", "/score", {"text": "abc"})[0] == 200


def _generate_text(server, **body) -> str:
    code, answer = _call(server, "POST", "/generate", {"prompt": "ab", "max_new_tokens": 40, **body})
    assert code == 200, answer
    return answer["text"]


def test_greedy_decoding_equals_hf_generate(ready):
    from everlearn.deploy.decoding import decode, new_generator

    model, tok = ready.loaded.model, ready.tokenizer
    for prompt, n in (("ab", 20), ("hello world", 40), ("", 10), ("x" * 50, 14)):
        ids = tok.encode(prompt).tolist() or [tok.eos_id]
        inputs = torch.tensor([ids])
        with torch.no_grad():
            hf = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id)
        expected = hf[0, len(ids):].tolist()
        assert _generate_text(ready, prompt=prompt, max_new_tokens=n) == tok.decode(expected)
        ours = decode(model, ids, max_new_tokens=n, temperature=0.0, top_k=50, generator=new_generator(None), eos_id=tok.eos_id)
        assert ours == expected
        # stopping: with the third greedy token as EOS, both stop there and keep the EOS
        eos = expected[2]
        with torch.no_grad():
            hf = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id, eos_token_id=eos)
        stopped = decode(model, ids, max_new_tokens=n, temperature=0.0, top_k=50, generator=new_generator(None), eos_id=eos)
        assert stopped == hf[0, len(ids):].tolist() == expected[: expected.index(eos) + 1]


def test_a_tiny_temperature_samples_the_greedy_tokens(ready):
    """Scaling by a subnormal temperature must sharpen towards greedy, not overflow into NaN probabilities."""
    greedy = _generate_text(ready)
    assert _generate_text(ready, temperature=5e-324) == greedy
    assert _generate_text(ready, temperature=1e-300, seed=1) == greedy


def test_seeded_sampling_is_reproducible_while_requests_run_concurrently(ready):
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(2)  # intra-op threads too, so forward passes of different requests overlap
    seeds = [1, 2] * 6
    sequential = {seed: _generate_text(ready, temperature=1.5, seed=seed) for seed in (1, 2)}
    assert sequential[1] != sequential[2]  # the seed decides the sample
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda seed: _generate_text(ready, temperature=1.5, seed=seed), seeds))
    assert concurrent == [sequential[seed] for seed in seeds]


def test_sampling_leaves_the_global_rng_alone(ready):
    state = torch.get_rng_state()
    _generate_text(ready, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # a seeded request does not reseed anyone else's RNG
    # without a seed, each request draws fresh randomness: reseeding the global RNG does not repeat it
    texts = set()
    for _ in range(3):
        torch.manual_seed(0)
        texts.add(_generate_text(ready, temperature=5.0, max_new_tokens=60))
    assert len(texts) > 1


def _record_input_shapes(model) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes


def _unpadded_loss(model, ids: list[int], context: int) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context):
            chunk = torch.tensor([ids[start : start + context]])
            if chunk.shape[1] < 2:
                continue
            logits = model(input_ids=chunk).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return total / count, count


@pytest.mark.parametrize(("length", "shapes"), [(10, [(1, 10)]), (64, [(1, 64)]), (70, [(2, 64)]), (200, [(4, 64)])])
def test_score_pads_only_to_the_longest_chunk_and_matches_the_unpadded_loss(ready, length, shapes):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(length))
    model = ready.loaded.model
    recorded = _record_input_shapes(model)
    code, answer = _call(ready, "POST", "/score", {"text": text})
    assert code == 200 and recorded == shapes
    loss, count = _unpadded_loss(model, ready.tokenizer.encode(text).tolist(), 64)
    assert answer["tokens"] == count and answer["loss"] == pytest.approx(loss, rel=1e-5)
