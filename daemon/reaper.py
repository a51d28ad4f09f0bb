"""The reaper: when the daemon dies, however it dies, the processes it started die too.

A local Ray is made of processes the daemon started (GCS, raylet, workers,
agents). Most share the daemon's fate, but some outlive a ``kill -9`` of it by a
minute or more (Ray's agents try to report the raylet's death to a GCS that
died with it). The daemon starts this small process first, in a session of its
own, and keeps the write end of a pipe to it. Once Ray is up, the daemon
writes the pids of the processes Ray started (its children that appeared
during ``ray.init``) into the pipe; while the daemon lives, the reaper notes
those and their descendants every second (pid and start time), and nothing
else the daemon's process may have started (in tests: servers of fixtures).
When the pipe reads end-of-file the daemon is gone: the reaper kills every
noted process that still runs, then exits. It imports nothing of everlearn,
torch or Ray.
"""

import os
import select
import signal
import subprocess
import sys
import time

INTERVAL_S = 1.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _table() -> tuple[dict[int, list[int]], dict[int, int]]:
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    return children, starts


def children(pid: int) -> set[int]:
    """The live direct children of ``pid``."""
    return set(_table()[0].get(pid, []))


def descendants(root: int, include_root: bool = False) -> dict[int, int]:
    """Every live descendant of ``root`` (and ``root`` itself if asked): pid -> start time."""
    kids, starts = _table()
    out, todo = {}, [root]
    if include_root and root in starts:
        out[root] = starts[root]
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in out:
                out[child] = starts[child]
                todo.append(child)
    return out


def reap(noted: dict[int, int], me: int) -> int:
    """SIGKILL each noted process still running as the same process (same start time); returns how many."""
    killed = 0
    for pid, start in noted.items():
        st = _stat(pid)
        if pid != me and st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def main(daemon_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the daemon is not for the reaper
    me, roots, noted, buf = os.getpid(), set(), {}, b""
    while True:
        for root in roots:
            noted.update(descendants(root, include_root=True))
        ready, _, _ = select.select([sys.stdin.buffer], [], [], INTERVAL_S)
        if ready:
            data = os.read(sys.stdin.fileno(), 4096)
            if not data:
                break  # end of file: the daemon's end of the pipe closed, so the daemon is gone
            buf += data
            *lines, buf = buf.split(b"\n")
            roots |= {int(p) for line in lines for p in line.split()}
        noted = {pid: start for pid, start in noted.items() if _stat(pid) is not None}
    time.sleep(0.5)  # a clean exit has stopped Ray already: give its last processes a moment
    reap(noted, me)


def watch(handle: subprocess.Popen, pids: set[int]) -> None:
    """Tell the reaper to take ``pids`` and their descendants with it when this process dies."""
    if pids:
        handle.stdin.write(" ".join(map(str, sorted(pids))).encode() + b"\n")
        handle.stdin.flush()


def start() -> subprocess.Popen:
    """Start the reaper for this process; keep the returned handle (its stdin is the pipe) for the process's life."""
    # run as a file, not as a module of the package: importing everlearn.daemon would import torch
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
