"""The daemon's probe endpoints: /healthz (degraded: for monitoring) and /livez (a stuck loop: for a liveness probe)."""

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from everlearn.daemon.http import StatusServer
from everlearn.daemon.runtime import LoopWatch

pytestmark = pytest.mark.unit


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_healthz_and_livez_answer_their_own_problems():
    state = {"health": [], "live": []}
    server = StatusServer("127.0.0.1", 0, CollectorRegistry(), dict, lambda: state["health"], lambda: state["live"]).start()
    try:
        assert get(server.url + "/healthz") == (200, {"ok": True}) and get(server.url + "/livez") == (200, {"ok": True})
        state["health"] = ["checkpoint storage failing for 40 s"]
        assert get(server.url + "/healthz") == (503, {"ok": False, "degraded": ["checkpoint storage failing for 40 s"]})
        assert get(server.url + "/livez") == (200, {"ok": True})  # degraded is not a reason to restart
        state["live"] = ["stuck"]
        assert get(server.url + "/livez")[0] == 503
        assert "/livez" in get(server.url + "/nothing")[1]["error"]
    finally:
        server.stop()


def test_liveness_fails_only_when_the_loop_stopped_turning():
    now = [1000.0]
    watch = LoopWatch(60, clock=lambda: now[0])
    assert watch.problems() == []  # not started yet: startup is the startup probe's business
    watch.tick()
    now[0] = 1059.0
    assert watch.problems() == []
    now[0] = 1061.0
    assert watch.problems() == ["the supervisor loop has not turned for 61 s (supervision.liveness_timeout_s=60)"]
    watch.tick()
    assert watch.problems() == []
