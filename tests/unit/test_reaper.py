"""The reaper (daemon/reaper.py): what it notes, what it kills, and that it outlives a SIGKILLed daemon to clean up.

Every process started here lives 60 s at most and is SIGKILLed by pid at the end of its test.
"""

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from everlearn.daemon import reaper

pytestmark = pytest.mark.unit


@pytest.fixture
def pids():
    """Pids a test started (directly or not): each SIGKILLed at the end."""
    started: list[int] = []
    popens: list[subprocess.Popen] = []
    yield started, popens
    for pid in started + [p.pid for p in popens]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in popens:
        p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody reaped yet (its parent may be a container's pid 1)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return True
    return state in (b"Z", b"X")


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(gone(p) for p in pids)


def start_time(pid: int) -> int:
    st = reaper._stat(pid)
    assert st is not None
    return st[1]


def shell_with_grandchild(pids) -> tuple[int, int]:
    """This process -> sh -> sleep 60; returns (sh, sleep)."""
    _, popens = pids
    sh = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    popens.append(sh)
    ready, _, _ = select.select([sh.stdout], [], [], 10)
    assert ready
    grandchild = int(sh.stdout.readline())
    pids[0].append(grandchild)
    return sh.pid, grandchild


def test_stat_reads_parent_and_start_time():
    parent, start = reaper._stat(os.getpid())
    assert parent == os.getppid() and start > 0
    assert reaper._stat(2**22 + 12345) is None  # beyond pid_max: no such process


def test_descendants_finds_children_and_grandchildren(pids):
    sh, sleep = shell_with_grandchild(pids)
    mine = reaper.descendants(os.getpid())
    assert sh in mine and sleep in mine
    assert mine[sh] == start_time(sh) and mine[sleep] == start_time(sleep)
    assert os.getpid() not in mine
    below_sh = reaper.descendants(sh)
    assert sleep in below_sh and sh not in below_sh
    assert reaper.descendants(sleep) == {}


def test_reap_kills_only_processes_that_are_still_the_ones_noted(pids):
    started, popens = pids
    a, b, me = (subprocess.Popen(["sleep", "60"]) for _ in range(3))
    popens.extend([a, b, me])
    finished = subprocess.Popen(["true"])
    finished.wait(10)
    noted = {
        a.pid: start_time(a.pid),
        b.pid: start_time(b.pid) - 1,  # the pid was reused: another process started at another time
        me.pid: start_time(me.pid),  # the reaper itself
        finished.pid: 1,  # gone
    }
    assert reaper.reap(noted, me=me.pid) == 1
    assert a.wait(10) == -signal.SIGKILL
    assert b.poll() is None and me.poll() is None


REAPED_DAEMON = textwrap.dedent("""
    import importlib.util, json, subprocess, sys, time
    spec = importlib.util.spec_from_file_location("reaper", sys.argv[1])
    reaper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reaper)
    handle = reaper.start()
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2]], stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    reaper.watch(handle, {child.pid})  # what Ray started; the rest of this process's children are not the reaper's
    other = subprocess.Popen(["sleep", "60"])
    print(json.dumps({"reaper": handle.pid, "child": child.pid, "grandchild": grandchild, "other": other.pid}), flush=True)
    time.sleep(60)
""")

STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    grandchild = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild.stdout.readline()  # it ignores SIGTERM now
    print(grandchild.pid, flush=True)
    time.sleep(60)
""")


def test_a_sigkilled_daemon_s_children_and_grandchildren_are_reaped(pids):
    started, popens = pids
    bystander = subprocess.Popen(["sleep", "60"])  # runs beside the daemon, not under it
    popens.append(bystander)
    daemon = subprocess.Popen([sys.executable, "-c", REAPED_DAEMON, reaper.__file__, STUBBORN], stdout=subprocess.PIPE, text=True)
    popens.append(daemon)
    ready, _, _ = select.select([daemon.stdout], [], [], 30)
    assert ready, "the daemon did not start its processes within 30 s"
    info = json.loads(daemon.stdout.readline())
    started.extend([info["reaper"], info["child"], info["grandchild"], info["other"]])
    for name in ("reaper", "child", "grandchild"):
        assert not gone(info[name]), name
    assert info["reaper"] in reaper.descendants(daemon.pid)
    assert os.getsid(info["reaper"]) == info["reaper"]  # a session of its own: a Ctrl-C or SIGTERM to the group misses it
    time.sleep(reaper.INTERVAL_S * 2.5)  # the reaper notes descendants every second

    daemon.send_signal(signal.SIGKILL)
    assert daemon.wait(10) == -signal.SIGKILL
    assert wait_gone([info["child"], info["grandchild"]], timeout=5), "the daemon's processes outlived it"
    assert wait_gone([info["reaper"]], timeout=5), "the reaper did not exit"
    assert bystander.poll() is None
    assert not gone(info["other"]), "the reaper killed a process Ray did not start"

