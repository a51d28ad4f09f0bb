"""The serving replica in-process: its FastAPI app driven by a TestClient, its registry an in-memory double (no Ray)."""

import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from everlearn.deploy.deployment import Server
from everlearn.deploy.http_api import build_api
from everlearn.deploy.registry import FRESH_S, MemoryRegistry, RegistryState
from everlearn.deploy.serve_config import ServeConfig
from everlearn.deploy.serving import LanguageModelServer
from everlearn.errors import ServingError
from everlearn.learners import CheckpointStore, Learner, ModelConfig, ScheduleConfig, TrainConfig
from everlearn.learners.weights import full_tensors

pytestmark = pytest.mark.unit

MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
APP = "everlearn-test"


@pytest.fixture(autouse=True)
def _in_process_replica(monkeypatch):
    """serve.batch asks Serve for the replica's context (to compare max_batch_size with max_ongoing_requests): give it one."""
    from ray import serve

    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="replica-1"), _deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()  # a replica sets its own thread count; give the rest of the suite its own back
    yield
    torch.set_num_threads(n)


class Replica:
    """A replica, its registry and an HTTP client of its app; ``call`` returns (status, JSON)."""

    def __init__(self, record: dict | None = None, **settings):
        self.registry = MemoryRegistry(record)
        self.server = LanguageModelServer({"model": MODEL.model_dump(), "app_name": APP, **settings}, registry=self.registry, wait_s=0)
        self.client = TestClient(build_api(self.server), raise_server_exceptions=False)
        self.client.__enter__()  # one event loop for the client's life: serve.batch's queue lives on it

    def call(self, method: str, path: str, body=None) -> tuple[int, dict]:
        raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
        resp = self.client.request(method, path, content=raw)
        return resp.status_code, resp.json()

    def wait_version(self, version: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.loaded is not None and self.server.loaded.info.get("version") == version:
                return
            time.sleep(0.01)
        raise AssertionError(f"the replica did not load version {version}")

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.server.close()


@pytest.fixture
def replicas():
    made: list[Replica] = []

    def make(record: dict | None = None, **settings) -> Replica:
        made.append(Replica(record, **settings))
        return made[-1]

    yield make
    for r in made:
        r.close()


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


@pytest.fixture
def ready(replicas):
    """A replica serving version 0 with the built (untrained) weights: no checkpoint store needed."""
    return replicas({"version": 0})


def test_not_ready_before_a_version_is_loaded(replicas):
    r = replicas()  # the registry holds no record yet
    assert r.call("GET", "/healthz") == (503, {"ok": False})
    assert r.call("GET", "/version")[0] == 503
    assert r.call("POST", "/score", {"text": "abc"})[0] == 503
    r.registry.set({"version": 0})  # the watcher loads it off the request path
    r.wait_version(0)
    assert r.call("GET", "/healthz") == (200, {"ok": True})


def test_the_registry_swaps_the_replica_to_the_promoted_weights(trained, replicas):
    store, ref0, ref5, learner = trained
    r = replicas({"version": 0, **ref0.to_dict()})
    assert r.call("GET", "/version") == (200, {"version": 0, "step": 0, "checkpoint": ref0.uri, "manifest_sha256": ref0.manifest_sha256,
                                               "promoted_unix": None, "replica_pid": os.getpid(), "replica_id": "replica-1"})
    text = "".join(chr(97 + (i % 5)) for i in range(15))  # bytes 97..101 = ids 100..104: what the learner saw
    loss0 = r.call("POST", "/score", {"text": text})[1]["loss"]
    r.registry.set({"version": 1, **ref5.to_dict()})
    r.wait_version(1)
    code, answer = r.call("POST", "/score", {"text": text})
    assert code == 200 and answer["version"] == 1
    assert answer["loss"] < loss0 - 0.5
    assert safetensors.torch.save(full_tensors(r.server.loaded.model)) == store.read(ref5, "model.safetensors")  # exactly the promoted bytes
    # the replica reported what it holds: that is how a swap knows it is done
    (report,) = r.registry.state.live()
    assert report["manifest_sha256"] == ref5.manifest_sha256 and report["version"] == 1 and report["error"] is None
    # the same weights under another version number: renumbered, not reloaded
    before = r.server.loaded.model
    r.server.load({"version": 2, **ref5.to_dict()})
    assert r.server.loaded.model is before and r.call("GET", "/version")[1]["version"] == 2


def test_a_lora_replica_holds_the_base_once_and_swaps_only_adapters(tmp_path, replicas):
    lora = MODEL.model_copy(update={"lora": MODEL.lora.model_copy(update={"r": 4})})
    url = str(tmp_path / "lora")
    learner = Learner(lora, TrainConfig(seq_len=16, batch_size=4, torch_threads=1),
                      ScheduleConfig(warmup_steps=1, cooldown_steps=1, peak_lr=3e-2, constant_lr=3e-2, min_lr=1e-3), url)
    store = CheckpointStore(url)
    ref0 = store.commit(0, learner.save(0))
    tokens = np.tile((np.arange(16, dtype=np.int32) % 5) + 100, (4, 1))
    for _ in range(8):
        learner.train_step(tokens)
    ref8 = store.commit(8, learner.save(8))
    assert "adapter.safetensors" in store.manifest(ref8)["files"] and "model.safetensors" not in store.manifest(ref8)["files"]

    r = replicas({"version": 0, **ref0.to_dict()}, model=lora.model_dump())
    text = "".join(chr(97 + (i % 5)) for i in range(15))
    loss0 = r.call("POST", "/score", {"text": text})[1]["loss"]
    first = r.server.loaded.model
    r.registry.set({"version": 1, **ref8.to_dict()})
    r.wait_version(1)
    code, answer = r.call("POST", "/score", {"text": text})
    assert code == 200 and answer["version"] == 1 and answer["loss"] < loss0 - 0.1
    base = r.server.models.base.get_input_embeddings().weight
    assert first.get_input_embeddings().weight.data_ptr() == base.data_ptr() == r.server.loaded.model.get_input_embeddings().weight.data_ptr()
    assert first is not r.server.loaded.model  # the old version's model is untouched: requests that hold it finish on it
    assert r.call("GET", "/version")[1]["manifest_sha256"] == ref8.manifest_sha256


@pytest.mark.parametrize(("family", "lora"), [("gpt2", None), ("llama", 4), ("qwen2", None)])
def test_each_model_family_is_judged_and_served(tmp_path, replicas, family, lora):
    """A save_pretrained directory of each family, trained a few steps: the evaluator judges it against its
    step 0 with every gate measured, and a replica serves it with the directory's own tokenizer."""
    from everlearn.deploy import Evidence, GateConfig
    from everlearn.deploy.evaluator import Evaluator
    from tests.hf_models import save_tiny

    seq = 32
    mcfg = ModelConfig(name_or_path=str(save_tiny(family, tmp_path / family, width=32, layers=1, context=64)), lora={"r": lora})
    url = str(tmp_path / "ckpt")
    learner = Learner(mcfg, TrainConfig(seq_len=seq, batch_size=8, torch_threads=1),
                      ScheduleConfig(warmup_steps=1, cooldown_steps=1, peak_lr=1e-2, constant_lr=1e-2, min_lr=1e-3), url)
    store = CheckpointStore(url)
    ref0 = store.commit(0, learner.save(0))
    text = "def load(path):\n    with open(path) as f:\n        return json.load(f)\n" * 40
    ids = learner.tokenizer.encode(text)
    rows = ids[: (len(ids) // seq) * seq].reshape(-1, seq)
    for _ in range(10):
        learner.train_step(rows[:8])
    ref1 = store.commit(10, learner.save(10))

    fresh, old = rows[8:16], rows[:8]
    evidence = Evidence(fresh, np.full(len(fresh), seq), old, np.full(len(old), seq), fresh_documents=np.arange(len(fresh)) // 2,
                        old_documents=np.arange(len(old)) // 2, old_domains=("code",) * len(old),
                        probe_tokens=rows[:4], probe_lengths=np.full(4, seq))
    result = Evaluator(mcfg).judge(GateConfig(min_fresh_documents=4, min_fresh_tokens=100), ref1, ref0, evidence)
    assert {g["name"] for g in result.metrics["gates"]} >= {"sanity", "improvement", "forgetting", "behaviour", "generation"}
    assert result.metrics["improvement"]["lower"] > 0, result.reason  # it learned this text

    r = replicas({"version": 1, **ref1.to_dict()}, model=mcfg.model_dump())
    code, scored = r.call("POST", "/score", {"text": text[:300]})
    n = len(learner.tokenizer.encode(text[:300]))  # the family's own tokenizer: BPE gives fewer ids than bytes
    assert code == 200 and scored["version"] == 1 and n - (n // 64 + 1) <= scored["tokens"] < n  # one unpredicted token per context
    code, generated = r.call("POST", "/generate", {"prompt": "def load(", "max_new_tokens": 8})
    assert code == 200 and isinstance(generated["text"], str)
    code, completion = r.call("POST", "/v1/completions", {"model": APP, "prompt": "def ", "max_tokens": 4})
    assert code == 200 and completion["choices"][0]["text"] is not None


def test_a_damaged_checkpoint_is_refused_reported_and_serving_keeps_its_version(trained, tmp_path, replicas):
    store, ref0, ref5, _ = trained
    r = replicas({"version": 0, **ref0.to_dict()})
    path = tmp_path / "ckpt" / ref5.name / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ServingError, match="sha256"):
        r.server.load({"version": 1, **ref5.to_dict()})
    assert r.call("GET", "/version")[1]["version"] == 0
    (report,) = r.registry.state.live()
    assert report["version"] == 0 and report["error"]["manifest_sha256"] == ref5.manifest_sha256 and "sha256" in report["error"]["message"]
    assert r.registry.state.progress(1, ref5.manifest_sha256, 1)["state"] == "error"  # what makes Server.swap raise at once
    # a replica that starts while the registry holds it does not come up: Serve tries again
    with pytest.raises(ServingError, match="sha256"):
        LanguageModelServer({"model": MODEL.model_dump()}, registry=MemoryRegistry({"version": 1, **ref5.to_dict()}), wait_s=0)


def test_generate_and_bad_requests(ready):
    code, answer = ready.call("POST", "/generate", {"prompt": "ab", "max_new_tokens": 5})
    assert code == 200 and isinstance(answer["text"], str) and answer["version"] == 0
    body = {"prompt": "ab", "max_new_tokens": 5, "temperature": 1.0, "seed": 3}
    code, sampled = ready.call("POST", "/generate", body)
    assert code == 200 and sampled == ready.call("POST", "/generate", body)[1]
    assert ready.call("POST", "/generate", b"{nope")[0] == 400
    assert ready.call("POST", "/generate", [1, 2])[0] == 400
    assert ready.call("POST", "/generate", {"prompt": 3})[0] == 400
    assert ready.call("POST", "/generate", {"max_new_tokens": 10_000})[0] == 400
    assert ready.call("POST", "/score", {"text": ""})[0] == 400
    assert ready.call("POST", "/score", {"text": "a"})[0] == 400  # nothing to predict
    code, answer = ready.call("GET", "/nowhere")
    assert code == 404 and "/generate" in answer["error"]
    code, answer = ready.call("GET", "/score")  # a wrong method: 405, with the routes too
    assert code == 405 and "POST /score" in answer["error"]
    assert ready.client.get("/openapi.json").json()["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]


def test_score_covers_text_longer_than_the_context(ready):
    code, answer = ready.call("POST", "/score", {"text": "x" * 200})  # > max_position_embeddings=64
    assert code == 200 and answer["tokens"] == 200 - 4  # 4 chunks of <= 64, each predicts all but its first token


def test_score_refuses_more_tokens_than_its_bound_fast_saying_how_to_split(replicas):
    r = replicas({"version": 0}, max_score_tokens=128)
    assert r.call("POST", "/score", {"text": "x" * 128})[0] == 200
    code, answer = r.call("POST", "/score", {"text": "x" * 129})
    assert code == 400 and "'text' is 129 tokens; one /score request takes at most 128 (serve.max_score_tokens)" in answer["error"]
    assert "Split the text into parts of at most 128 tokens" in answer["error"]
    default = replicas({"version": 0})
    t0 = time.perf_counter()
    code, answer = default.call("POST", "/score", {"text": "lorem ipsum " * 25_000})  # 300 kB, the default bound
    assert code == 400 and "300,000 tokens" in answer["error"] and time.perf_counter() - t0 < 2


# -- request validation, decoding and scoring --------------------------------------------------------------


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
    code, answer = ready.call("POST", "/generate", _raw(body))
    assert code == 400, answer
    assert set(answer) == {"error"} and f"'{field}'" in answer["error"], answer


@pytest.mark.parametrize(("body", "field"), BAD_SCORE)
def test_score_refuses_bad_fields_with_400_naming_the_field(ready, body, field):
    code, answer = ready.call("POST", "/score", _raw(body))
    assert code == 400, answer
    assert set(answer) == {"error"} and f"'{field}'" in answer["error"], answer


@pytest.mark.parametrize("path", ["/generate", "/score", "/v1/completions"])
@pytest.mark.parametrize("body", BAD_BODIES, ids=lambda b: repr(b[:20]))
def test_bodies_that_are_not_a_utf8_json_object_get_400(ready, path, body):
    code, answer = ready.call("POST", path, body)
    assert code == 400, answer
    message = answer["error"]["message"] if path.startswith("/v1") else answer["error"]
    assert "request body" in message and "{" in message, answer  # says what a body looks like


def test_validation_messages_say_what_is_allowed(ready):
    error = ready.call("POST", "/generate", {"max_new_tokens": True})[1]["error"]
    assert error == "'max_new_tokens': Input should be a valid integer, got boolean (allowed: an integer from 1 to 512)"
    error = ready.call("POST", "/generate", _raw('{"temperature": NaN}'))[1]["error"]
    assert error.startswith("'temperature': Input should be a finite number, got nan (allowed: a finite number from 0")
    error = ready.call("POST", "/generate", {"temperature": 1, "top_k": 385})[1]["error"]
    assert "top_k=385 is more than the model's vocabulary of 384 tokens" in error
    error = ready.call("POST", "/generate", {"prompt": "a", "top_p": 0.9})[1]["error"]
    assert error == "unknown field 'top_p'; the fields are: prompt, max_new_tokens, temperature, top_k, seed"
    error = ready.call("POST", "/generate", {"prompt": "ab", "max_new_tokens": 64})[1]["error"]
    assert "more than the model's context of 64 tokens" in error and "at most 62 new tokens" in error
    error = ready.call("POST", "/generate", {"prompt": "a" * 64, "max_new_tokens": 1})[1]["error"]
    assert error.startswith("'prompt' is 64 tokens: it fills the model's context of 64 tokens")
    error = ready.call("POST", "/generate", {"seed": -1, "top_k": 0})[1]["error"]  # every problem, not only the first
    assert "'top_k'" in error and "'seed'" in error
    assert ready.call("POST", "/score", b"")[1]["error"].startswith("'text' is required (allowed: a non-empty string")


def test_values_at_the_limits_are_accepted(ready):
    ok = [{"prompt": "", "max_new_tokens": 1}, {"prompt": "a" * 63, "max_new_tokens": 1}, {"prompt": "a", "max_new_tokens": 63},
          {"max_new_tokens": 3, "temperature": 10, "top_k": 384, "seed": 2**64 - 1}, {"max_new_tokens": 3, "temperature": 1e-3, "top_k": 1, "seed": 0},
          {"max_new_tokens": 3, "temperature": 0.5, "seed": None}, {"max_new_tokens": 3, "temperature": 1}]  # an integer temperature is a number
    for body in ok:
        code, answer = ready.call("POST", "/generate", body)
        assert code == 200 and set(answer) == {"text", "version"}, (body, answer)
    code, answer = ready.call("POST", "/score", {"text": "ab"})
    assert code == 200 and set(answer) == {"loss", "tokens", "version"} and answer["tokens"] == 1


def test_no_field_value_reaches_the_internal_error_path(ready):
    """Every JSON kind in every field answers 200 or 400: bad input never shows up as a 500."""
    values = ["null", "true", "false", "0", "-1", "1", "2", "63", "385", str(2**64), "1.5", "-0.0", "1e-320", "NaN", "-Infinity", "1e999",
              '""', '"x"', '"\\u0000"', '"\\ud800"', "[]", "{}", '[{"a": null}]']
    completion = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "user", "echo", "logprobs", "best_of"]
    for path, fields in (("/generate", ["prompt", "max_new_tokens", "temperature", "top_k", "seed"]), ("/score", ["text"]),
                         ("/v1/completions", completion)):
        for field in fields:
            for value in values:
                extra = {"/generate": '"max_new_tokens": 2, ', "/score": "", "/v1/completions": f'"model": "{APP}", "prompt": "a", "max_tokens": 2, '}[path]
                body = f'{{{extra if field not in extra else ""}"{field}": {value}}}'
                resp = ready.client.post(path, content=_raw(body))  # "stream": true answers events, not JSON
                assert resp.status_code in (200, 400, 404), (path, field, value, resp.text)


def test_an_unexpected_failure_answers_500_and_the_replica_keeps_serving(ready, monkeypatch, caplog):
    from everlearn.deploy import serving

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(serving, "decode", broken)
    code, answer = ready.call("POST", "/generate", {"prompt": "ab", "max_new_tokens": 2})
    assert code == 500 and set(answer) == {"error"} and "RuntimeError" in answer["error"]
    assert "boom" in caplog.text  # the traceback is in the log, not in the answer
    assert ready.call("GET", "/healthz") == (200, {"ok": True})
    assert ready.call("POST", "/score", {"text": "abc"})[0] == 200
    ready.server.report()  # the heartbeat carries the replica's answer counts (Server.request_counts sums them)
    (report,) = ready.registry.state.live()
    assert (report["requests"], report["errors"]) == (3, 1)


def _generate_text(replica, **body) -> str:
    code, answer = replica.call("POST", "/generate", {"prompt": "ab", "max_new_tokens": 40, **body})
    assert code == 200, answer
    return answer["text"]


def test_greedy_decoding_equals_hf_generate(ready):
    from everlearn.deploy.decoding import decode, new_generator

    model, tok = ready.server.loaded.model, ready.server.tokenizer
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


def _text(length: int, seed: int = 0) -> str:
    return "".join(chr(97 + (i * 7 + seed * 3) % 26) for i in range(length))


@pytest.mark.parametrize(("length", "shapes"), [(10, [(1, 10)]), (64, [(1, 64)]), (70, [(2, 64)]), (200, [(4, 64)])])
def test_score_pads_only_to_the_longest_chunk_and_matches_the_unpadded_loss(ready, length, shapes):
    text = _text(length)
    model = ready.server.loaded.model
    recorded = _record_input_shapes(model)
    code, answer = ready.call("POST", "/score", {"text": text})
    assert code == 200 and recorded == shapes
    loss, count = _unpadded_loss(model, ready.server.tokenizer.encode(text).tolist(), 64)
    assert answer["tokens"] == count and answer["loss"] == pytest.approx(loss, rel=1e-5)


def test_score_rows_of_texts_batched_together_equal_each_text_alone(ready):
    from everlearn.deploy.scoring import chunks, score_rows

    model, tok = ready.server.loaded.model, ready.server.tokenizer
    texts = [chunks(tok.encode(_text(n, seed)), 64) for seed, n in enumerate((5, 64, 70, 200, 3, 131, 17))]
    shapes = _record_input_shapes(model)
    together = score_rows(model, texts, tok.pad_id, forward_tokens=256)
    assert all(rows * width <= 256 for rows, width in shapes) and max(w for _, w in shapes) == 64 and min(w for _, w in shapes) < 64
    for text, batched in zip(texts, together, strict=True):
        (alone,) = score_rows(model, [text], tok.pad_id)
        assert batched.tokens == alone.tokens and batched.loss_sum == pytest.approx(alone.loss_sum, rel=1e-5)


def test_concurrent_score_requests_share_a_batch_and_each_gets_its_own_loss(replicas):
    from concurrent.futures import ThreadPoolExecutor

    r = replicas({"version": 0}, batch_wait_timeout_s=0.3, max_batch_size=8)
    texts = [_text(n, seed) for seed, n in enumerate((12, 64, 90, 30, 150, 7))]
    alone = [r.call("POST", "/score", {"text": t})[1] for t in texts]
    shapes = _record_input_shapes(r.server.loaded.model)
    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(lambda t: r.call("POST", "/score", {"text": t})[1], texts))
    assert len(shapes) < len(texts)  # fewer forwards than requests: they were batched
    for a, b in zip(alone, together, strict=True):
        assert a["tokens"] == b["tokens"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)


# -- the OpenAI-compatible endpoints ------------------------------------------------------------------------


def _complete(replica, **body) -> tuple[int, dict]:
    return replica.call("POST", "/v1/completions", {"model": APP, "prompt": "ab", **body})


def _stream(replica, **body) -> list:
    resp = replica.client.post("/v1/completions", json={"model": APP, "prompt": "ab", "stream": True, **body})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in resp.text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and all(e.startswith("{") for e in events[:-1])
    return [json.loads(e) for e in events[:-1]]


def test_completions_answer_in_openai_shape_and_match_generate(ready):
    code, answer = _complete(ready, max_tokens=7, temperature=0)
    assert code == 200 and answer["object"] == "text_completion" and answer["model"] == APP and answer["id"].startswith("cmpl-")
    assert answer["system_fingerprint"] == "everlearn-v0-initial" and isinstance(answer["created"], int)
    (choice,) = answer["choices"]
    assert choice == {"text": _generate_text(ready, max_new_tokens=7), "index": 0, "logprobs": None, "finish_reason": "length"}
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
    assert _complete(ready)[1]["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
    assert _complete(ready, prompt=["ab"], max_tokens=7, temperature=0)[1]["choices"][0]["text"] == choice["text"]  # a list of one prompt
    code, models = ready.call("GET", "/v1/models")
    assert code == 200 and models["object"] == "list" and [m["id"] for m in models["data"]] == [APP]
    assert models["data"][0]["object"] == "model" and models["data"][0]["owned_by"] == "everlearn" and models["data"][0]["served_version"] == 0


def test_completions_n_seed_stop_and_top_p(ready):
    code, answer = _complete(ready, max_tokens=12, n=3, seed=5)
    texts = [c["text"] for c in answer["choices"]]
    assert code == 200 and [c["index"] for c in answer["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert _complete(ready, max_tokens=12, n=3, seed=5)[1]["choices"] == answer["choices"]  # seed + i per choice: reproducible
    assert _complete(ready, max_tokens=12, seed=6)[1]["choices"][0]["text"] == texts[1]
    greedy = _complete(ready, max_tokens=20, temperature=0)[1]["choices"][0]["text"]
    assert _complete(ready, max_tokens=20, top_p=1e-9, seed=1)[1]["choices"][0]["text"] == greedy  # a tiny nucleus: the likeliest token
    stop = greedy[5:7]
    stopped = _complete(ready, max_tokens=20, temperature=0, stop=[stop, "\x00never"])[1]["choices"][0]
    assert stopped["text"] == greedy[: greedy.index(stop)] and stopped["finish_reason"] == "stop"


def test_a_stream_is_server_sent_chunks_that_add_up_to_the_completion(ready):
    full = _complete(ready, max_tokens=20, n=2, seed=3, stop="q")[1]
    chunks = _stream(ready, max_tokens=20, n=2, seed=3, stop="q", stream_options={"include_usage": True})
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    for choice in full["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert "".join(m["text"] for m in mine) == choice["text"]
        assert [m["finish_reason"] for m in mine][-1] == choice["finish_reason"] and all(m["finish_reason"] is None for m in mine[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


BAD_COMPLETIONS = [  # (body, the param named, code)
    ({"model": APP, "prompt": "ab", "max_tokens": 5, "frobnicate": 1}, "frobnicate", None),
    ({"model": APP, "prompt": [1, 2, 3]}, "prompt", None),
    ({"model": APP, "prompt": ["a", "b"]}, "prompt", None),
    ({"model": APP, "prompt": "ab", "n": 9}, "n", None),
    ({"model": APP, "prompt": "ab", "temperature": 2.5}, "temperature", None),
    ({"model": APP, "prompt": "ab", "top_p": 0}, "top_p", None),
    ({"model": APP, "prompt": "ab", "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"model": APP, "prompt": "ab", "stop": ""}, "stop", None),
    ({"model": APP, "prompt": "ab", "logprobs": 3}, "logprobs", "unsupported_parameter"),
    ({"model": APP, "prompt": "ab", "echo": True}, "echo", "unsupported_parameter"),
    ({"model": APP, "prompt": "ab", "presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"prompt": "ab"}, "model", None),
    ({"model": APP, "prompt": "a" * 60, "max_tokens": 5}, "prompt", "context_length_exceeded"),
]


@pytest.mark.parametrize(("body", "param", "error_code"), BAD_COMPLETIONS, ids=lambda v: str(v)[:40])
def test_completions_refuse_bad_requests_in_openai_error_shape(ready, body, param, error_code):
    code, answer = ready.call("POST", "/v1/completions", body)
    assert code == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == error_code and f"'{param}'" in error["message"] or error_code == "context_length_exceeded"


def test_completions_messages_name_the_limits_and_neutral_fields_pass(ready):
    message = _complete(ready, prompt="a" * 60, max_tokens=5)[1]["error"]["message"]
    assert message.startswith("This model's maximum context length is 64 tokens. However, you requested 65 tokens (60 in the prompt, 5 for")
    message = _complete(ready, prompt=[1, 2])[1]["error"]["message"]
    assert "token-id arrays and several prompts in one request are not supported" in message
    code, answer = _complete(ready, model="gpt-4")
    assert code == 404 and answer["error"]["code"] == "model_not_found" and APP in answer["error"]["message"]
    neutral = {"echo": False, "logprobs": None, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "suffix": None,
               "user": "u-1", "max_tokens": None, "temperature": None, "n": None, "stream": False, "stop": None, "seed": None}
    assert _complete(ready, **neutral)[0] == 200  # what clients send by default is accepted
    assert ready.call("GET", "/v1/nowhere")[1]["error"]["type"] == "invalid_request_error"


def test_long_prompts_are_refused_unless_truncation_is_on_which_keeps_the_last_tokens(replicas):
    r = replicas({"version": 0}, truncate_prompts=True)
    prompt = "0123456789" * 10  # 100 tokens, context 64
    code, answer = r.call("POST", "/v1/completions", {"model": APP, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert code == 200 and answer["usage"]["prompt_tokens"] == 60
    kept = r.call("POST", "/v1/completions", {"model": APP, "prompt": prompt[-60:], "max_tokens": 4, "temperature": 0})[1]
    assert kept["choices"] == answer["choices"]
    assert r.call("POST", "/generate", {"prompt": prompt, "max_new_tokens": 4})[0] == 200
    assert r.call("POST", "/v1/completions", {"model": APP, "prompt": "a", "max_tokens": 64})[0] == 400  # new tokens alone fill it


def test_stream_text_holds_back_what_may_start_a_stop_sequence():
    from everlearn.deploy.decoding import stream_text

    decode = "".join
    assert list(stream_text(iter("hello"), decode, eos_id="$")) == [("h", None, 1), ("e", None, 2), ("l", None, 3), ("l", None, 4), ("o", None, 5), ("", "length", 5)]
    out = list(stream_text(iter("abcxyzd"), decode, eos_id="$", stop=["xyz", "q"]))
    assert "".join(d for d, _, _ in out) == "abc" and out[-1][1] == "stop"
    out = list(stream_text(iter("abxyab$zz"), decode, eos_id="$", stop=["xyz"]))
    assert "".join(d for d, _, _ in out) == "abxyab" and out[-1] == ("ab", "stop", 7)  # EOS ends it (and counts); the held text is flushed


# -- the registry and the daemon's side ------------------------------------------------------------------


def test_registry_tokens_progress_and_freshness():
    clock = SimpleNamespace(t=1000.0)
    state = RegistryState(clock=lambda: clock.t)
    t1 = state.set({"version": 1, "manifest_sha256": "a" * 64, "uri": "file:///x/step-1", "extra": "dropped"})
    assert state.set({"version": 1, "manifest_sha256": "a" * 64, "uri": "file:///x/step-1"}) == t1  # the same record: no change
    assert state.record == {"version": 1, "manifest_sha256": "a" * 64, "uri": "file:///x/step-1"}
    assert state.set({"version": 2, "manifest_sha256": "b" * 64}) != t1 and RegistryState().token != t1  # a restart is a new epoch
    state.report("r1", {"version": 1, "manifest_sha256": "a" * 64, "config_sha": "c"})
    state.report("r2", {"version": 2, "manifest_sha256": "b" * 64, "config_sha": "c"})
    assert state.progress(2, "b" * 64, 2)["state"] == "waiting" and state.progress(2, "b" * 64, 1)["state"] == "ok"
    clock.t += FRESH_S + 1  # r1 and r2 fall silent; r3 is new and holds the version
    state.report("r3", {"version": 2, "manifest_sha256": "b" * 64, "config_sha": "c"})
    assert [r["replica_id"] for r in state.live()] == ["r3"] and state.running_config() == "c"
    state.report("r4", {"version": 1, "manifest_sha256": "a" * 64, "error": {"version": 2, "manifest_sha256": "b" * 64, "message": "bad"}})
    progress = state.progress(2, "b" * 64, 1)
    assert progress["state"] == "error" and progress["error"] == "replica r4: bad"
    with pytest.raises(ValueError, match="version"):
        state.set({"uri": "x"})


def test_server_names_one_application_per_run_and_keeps_its_config_across_versions():
    a = Server(MODEL, ServeConfig(port=8123), "file:///runs/a/checkpoints")
    b = Server(MODEL, ServeConfig(port=8123), "file:///runs/b/checkpoints")
    assert a.app_name.startswith("everlearn-") and len(a.app_name) == len("everlearn-") + 8 and a.app_name != b.app_name
    assert Server(MODEL, ServeConfig(port=8123), "file:///runs/a/checkpoints").settings == a.settings  # stable across restarts
    named = Server(MODEL, ServeConfig(port=8123, app_name="run-a", route_prefix="/run-a"), "file:///runs/a/checkpoints")
    assert named.app_name == "run-a" and named.url == "http://127.0.0.1:8123/run-a" and a.url == "http://127.0.0.1:8123"
    assert named.settings.config_sha != a.settings.config_sha and a.settings.registry_name == f"{a.app_name}.registry"
    assert Server(MODEL, ServeConfig(port=8123, num_replicas=2), "file:///runs/a/checkpoints").settings.config_sha != a.settings.config_sha
    for bad in ("run-a", "/run-a/", "/a b"):
        with pytest.raises(ValueError, match="route_prefix"):
            ServeConfig(route_prefix=bad)
    with pytest.raises(ValueError):
        ServeConfig(app_name="no spaces allowed")
