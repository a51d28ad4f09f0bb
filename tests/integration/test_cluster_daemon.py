"""The Helm chart's topology on one machine: a Ray head started as KubeRay starts it (`ray start --head --block`,
the `ray-head` container) and the daemon joining it with the chart's `ray.address: auto` from a process of its own
(the `daemon` container, which shares /tmp and the process namespace with the head).

What the chart's README promises is checked: the daemon waits for a head that is not up yet; a real Prometheus,
given the chart's ServiceMonitors as static jobs and its alert rules, sees what /status says; a `kill -9` of the
daemon leaves serving answering on the promoted version; the restarted daemon joins the same cluster, finds
serving running and resumes training from its checkpoint; a clean stop leaves serving up.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from pathlib import Path

import psutil
import pytest

from everlearn.daemon import demo
from tests.conftest import free_port
from tests.e2e.helpers import DaemonProcess, get_json, post_json, tiny_config, wait_for
from tests.e2e.test_daemon import _write_stream
from tests.integration.test_prometheus import (
    assert_prometheus_sees_what_status_says,
    chart_scrape_config,
)

pytestmark = pytest.mark.integration


class RayHead:
    """`ray start --head --block` in a temp dir of its own; stopped, and anything it left killed, by PID."""

    def __init__(self, log: Path):
        # short: Ray's Unix socket paths must stay under ~100 characters
        self.tmp = Path(tempfile.mkdtemp(prefix="elray", dir="/tmp"))
        self.env = {**os.environ, "RAY_TMPDIR": str(self.tmp)}
        self.env.pop("RAY_ADDRESS", None)
        self._log = open(log, "ab")  # noqa: SIM115 (lives as long as the process)
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={free_port()}",
                                      "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def processes(self) -> list[psutil.Process]:
        """The processes of this head and its workers: they all carry our RAY_TMPDIR (or name it on their command line)."""
        mine = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if p.pid != os.getpid() and (any(str(self.tmp) in part for part in p.info["cmdline"] or [])
                                             or p.environ().get("RAY_TMPDIR") == str(self.tmp)):
                    mine.append(p)
        return mine

    def stop(self) -> None:
        """SIGTERM as the kubelet sends it; a node with live actors drains for up to 30 s, so after a few the rest is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        left = self.processes()
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=10)
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def head(tmp_path, monkeypatch):
    h = RayHead(tmp_path / "head.log")
    monkeypatch.setenv("RAY_TMPDIR", str(h.tmp))  # the daemons inherit it: `auto` finds this head's session
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield h
    h.stop()


class Hammer(threading.Thread):
    """/score every 50 ms until stopped: (unix time, version or the error) of each answer."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.results, self.stopped = url, [], threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.results.append((time.time(), post_json(f"{self.url}/score", {"text": "def main():\n    return 0\n"}, timeout=10)["version"]))
            except (OSError, urllib.error.URLError) as e:
                self.results.append((time.time(), f"{type(e).__name__}: {e}"))
            self.stopped.wait(0.05)


def test_the_daemon_restarts_alone_while_serving_on_the_joined_cluster_keeps_answering(tmp_path, head, prometheus_with):
    serve_port, metrics_port = free_port(), free_port()
    config = tiny_config(tmp_path, serve_port, metrics_port, ray={"address": "auto", "connect_timeout_s": 120})
    base, status_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{metrics_port}/status"
    docs = demo.take(demo.man_pages(), 40_000)
    _write_stream(tmp_path / "stream", "00-manpages.jsonl", "manpages", docs)

    jobs, rules_file, rule = chart_scrape_config(tmp_path, metrics_port, serve_port)
    first = DaemonProcess(config, log=tmp_path / "run1.log")  # started with the head, as the two containers are
    hammer = None
    try:
        api = prometheus_with(jobs, [rules_file])
        wait_for(lambda: (get_json(status_url)["served_version"] or 0) >= 1, 240, "a promotion on the joined cluster", first)
        events = [e["event"] for e in first.events()]
        assert "ready" in events
        assert_prometheus_sees_what_status_says(api, first, status_url.removesuffix("/status"), base, rules_file, rule)
        before = get_json(status_url)
        version = get_json(f"{base}/version")["version"]
        assert version == before["served_version"]

        hammer = Hammer(base)
        hammer.start()
        time.sleep(1)
        killed_at = time.time()
        first.kill()  # kill -9 of the daemon's container: the head, serving and its registry stay
        time.sleep(3)
        down = [r for t, r in hammer.results if t > killed_at]
        assert down and len(set(down)) == 1 and down[0] >= version, down[-5:]  # answered with no daemon, on the promoted version
        version = down[0]

        _write_stream(tmp_path / "stream", "01-python.jsonl", "python", demo.take(demo.python_sources(), 30_000))  # more while it is down
        second = DaemonProcess(config, log=tmp_path / "run2.log")
        try:
            wait_for(lambda: get_json(status_url)["step"] > before["step"], 240, "training resumed after the restart", second)
            resumed = [e for e in second.events() if e["event"] == "resumed"]
            assert resumed and resumed[0]["step"] >= 10  # from the checkpoint the first daemon committed
            hammer.stopped.set()
            hammer.join(15)
            failed = [r for _, r in hammer.results if not isinstance(r, int)]
            assert not failed and len(hammer.results) > 40, (failed[:5], len(hammer.results))
            seen = [r for _, r in hammer.results]
            assert seen == sorted(seen) and min(r for t, r in hammer.results if t > killed_at) == version  # never back, never a gap
            assert second.terminate(90) == 0
        finally:
            second.kill()
        assert post_json(f"{base}/score", {"text": "x = 1\n"})["version"] >= version  # a clean stop leaves serving up on the cluster
        assert head.proc.poll() is None and head.processes()
    finally:
        if hammer is not None:
            hammer.stopped.set()
        first.kill()
