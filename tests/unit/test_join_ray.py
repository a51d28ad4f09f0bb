"""Joining a Ray cluster that is not up yet (a daemon container starting before its Ray head): wait, then a clear error."""

import threading
import time

import pytest
import ray

from everlearn.daemon.runtime import join_ray
from everlearn.errors import ConfigError, EverlearnError

pytestmark = pytest.mark.unit


@pytest.fixture
def no_cluster(tmp_path, monkeypatch):
    """`auto` looks for a session under RAY_TMPDIR: an empty one means no cluster on this host."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()


def test_it_waits_with_events_then_says_what_to_check(no_cluster):
    events = []
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot join the Ray cluster at ray.address='auto' after \d+ s.*ray.connect_timeout_s"):
        join_ray("auto", 3.5, lambda name, **f: events.append((name, f)), threading.Event())
    assert 2.5 < time.monotonic() - t0 < 10
    assert [n for n, _ in events] == ["waiting_for_ray"] * 2  # pauses of 1 s then 2 s fit in 3.5 s
    assert "Could not find any running Ray instance" in events[0][1]["error"]
    assert not ray.is_initialized()


def test_a_stop_signal_ends_the_wait(no_cluster):
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(EverlearnError, match="stopped while waiting for the Ray cluster"):
        join_ray("auto", 60, lambda *a, **k: None, stop)
    assert time.monotonic() - t0 < 5
