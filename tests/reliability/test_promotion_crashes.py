"""A crash at every step of a promotion, and a promoted version that serving cannot load.

In-process daemons on one local Ray with serving on: the Serve application
outlives each daemon (as on a cluster the daemon joined), so after a crash it
still answers with whatever it held. The next daemon must put serving on exactly
the version SERVED.json records, and the audit log must hold every promotion.
"""

import io
import json
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from everlearn import failpoints
from everlearn.daemon.service import Daemon
from everlearn.learners import CheckpointStore
from tests.reliability.harness import (
    assert_nothing_lost,
    assert_only_verified_checkpoints,
    assert_serving_on_last_promoted,
    events,
    jsonl,
    man_docs,
    small_config,
    write_stream,
)

pytestmark = pytest.mark.reliability

# every failpoint of a promotion, in the order it passes them; True: the promotion has happened (SERVED.json written)
POINTS = [("promote.before_record", False), ("promote.after_record", True), ("promote.after_audit", True),
          ("promote.before_swap", True), ("promote.after_swap", True)]


@pytest.fixture(scope="module")
def serve_port():
    """Serve keeps the HTTP port it first started with: one port for the module's daemons."""
    from tests.conftest import free_port

    return free_port()


def _served(store):
    return json.loads(store.fs.cat_file(f"{store.root}/SERVED.json"))


def _version(url):
    with urllib.request.urlopen(f"{url}/version", timeout=10) as r:
        return json.loads(r.read())["version"]


def _config(tmp_path, port_factory, serve_port, **serve):
    return small_config(tmp_path, port_factory, serve={"enabled": True, "port": serve_port, **serve},
                        gate={"every_steps": 4, "min_improvement": 0.0, "max_forgetting": 10.0, "min_fresh_sequences": 1})[1]


class Running:
    """A daemon run in a thread; ``serving_at_ready`` is what /version said the moment it was ready."""

    def __init__(self, cfg, max_steps, url):
        self.out = io.StringIO()
        self.daemon = Daemon(cfg, registry=CollectorRegistry(), out=self.out)
        self.url, self.error, self.serving_at_ready, self.recorded_at_ready = url, None, None, None
        self.thread = threading.Thread(target=self._go, args=(max_steps,))
        self.thread.start()

    def _go(self, max_steps):
        try:
            self.daemon.run(max_steps=max_steps)
        except BaseException as e:  # noqa: BLE001 handed to the test
            self.error = e

    def wait_ready(self, store, timeout=120):
        deadline = time.monotonic() + timeout
        while self.daemon.state != "running" and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.recorded_at_ready = self.daemon.promote.served.get("version")
        self.serving_at_ready = _version(self.url)

    def join(self, timeout=300):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the daemon did not stop"
        return self.error


def test_a_crash_at_every_step_of_a_promotion_leaves_serving_on_the_recorded_version(local_ray, tmp_path, port_factory, serve_port):
    cfg = _config(tmp_path, port_factory, serve_port)
    url = f"http://127.0.0.1:{serve_port}"
    docs = man_docs(60_000)
    write_stream(tmp_path / "stream", "00-man.jsonl", "man", docs)
    store, run = CheckpointStore(cfg.checkpoint_url), tmp_path / "run"
    before, expected = 0, None
    for point, happened in [*POINTS, (None, False)]:
        failpoints.reload(f"{point}@1=raise" if point else "")
        r = Running(cfg, 200 if point else 6, url)
        r.wait_ready(store)
        if expected is not None:  # the restart after the last crash: serving on exactly the recorded version
            assert r.recorded_at_ready == r.serving_at_ready == expected, (point, r.recorded_at_ready, r.serving_at_ready, expected)
            audit = jsonl(run / "audit.jsonl")
            assert expected == 0 or any(a.get("promoted_version") == expected for a in audit), audit
        error = r.join()
        if point is None:
            assert error is None
            break
        assert isinstance(error, failpoints.FailpointError) and point in str(error), error
        before = r.daemon.promote.history[0]["version"] if happened else r.daemon.promote.served["version"]
        expected = _served(store)["version"]
        assert expected == before + happened, (point, before, expected)
        promoted = [a.get("promoted_version") for a in jsonl(run / "audit.jsonl") if a.get("verdict") == "promoted"]
        if point == "promote.after_record":  # SERVED.json says it happened; the audit record is the restart's to write
            assert expected not in promoted
    recovered = [a for a in jsonl(run / "audit.jsonl") if a.get("recovered")]
    assert [a["promoted_version"] for a in recovered] == [_served_after_record := recovered[0]["promoted_version"]]
    assert _served_after_record > 0
    assert_serving_on_last_promoted(run, store, url)
    assert_only_verified_checkpoints(store, [])
    assert_nothing_lost(run, store, dict(docs), exact=True, stream=tmp_path / "stream")


def test_a_version_serving_cannot_load_is_reverted(local_ray, tmp_path, port_factory, serve_port):
    cfg = _config(tmp_path, port_factory, serve_port, swap_timeout_s=20)
    url = f"http://127.0.0.1:{serve_port}"
    docs = man_docs(40_000)
    write_stream(tmp_path / "stream", "00-man.jsonl", "man", docs)
    store, run = CheckpointStore(cfg.checkpoint_url), tmp_path / "run"
    failpoints.reload("promote.before_swap@2=damage")  # the second promotion's weights are damaged after judging
    out = io.StringIO()
    daemon = Daemon(cfg, registry=CollectorRegistry(), out=out)
    final = daemon.run(max_steps=12)
    evs = events(out)
    reverted = [e for e in evs if e["event"] == "reverted"]
    assert len(reverted) == 1 and reverted[0]["version"] == 2 and reverted[0]["to"] == 1, reverted
    audit = jsonl(run / "audit.jsonl")
    undo = [a for a in audit if a.get("verdict") == "reverted"]
    assert undo and undo[0]["reverted_version"] == 2 and "could not load" in undo[0]["reason"]
    assert daemon.metrics.registry.get_sample_value("everlearn_promotions_reverted_total") == 1
    # serving never left version 1 for the damaged one; later promotions get new numbers (2 is never reused)
    assert final["served_version"] == _served(store)["version"] == _version(url)
    assert final["served_version"] == 1 or final["served_version"] >= 3
    assert_serving_on_last_promoted(run, store, url)
