"""The reaper: when the daemon dies, however it dies, the processes it started die too.

A local Ray is made of processes the daemon started (GCS, raylet, workers,
agents). Most share the daemon's fate, but some outlive a ``kill -9`` of it by a
minute or more (Ray's agents try to report the raylet's death to a GCS that
died with it). The daemon starts this small process first, in a session of its
own, and keeps the write end of a pipe to it. While the daemon lives, the
reaper notes its descendants every second (pid and start time); when the pipe
reads end-of-file, the daemon is gone and the reaper kills every noted process
that still runs, then exits. It imports nothing of everlearn, torch or Ray.
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


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
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
    me, noted = os.getpid(), {}
    while True:
        noted.update(descendants(daemon_pid))
        ready, _, _ = select.select([sys.stdin.buffer], [], [], INTERVAL_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # end of file: the daemon's end of the pipe closed, so the daemon is gone
        noted = {pid: start for pid, start in noted.items() if _stat(pid) is not None}
    time.sleep(0.5)  # a clean exit has stopped Ray already: give its last processes a moment
    reap(noted, me)


def start() -> subprocess.Popen:
    """Start the reaper for this process; keep the returned handle (its stdin is the pipe) for the process's life."""
    # run as a file, not as a module of the package: importing everlearn.daemon would import torch
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
