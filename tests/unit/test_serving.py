"""The serving replica in-process: loading promoted versions and answering requests (no Ray)."""

import asyncio
import json
import os

import numpy as np
import pytest
import torch
from starlette.requests import Request

from everlearn.deploy.serving import ServeConfig, build_app, deploy_config
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
