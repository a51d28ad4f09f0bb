"""CPU time by process from /proc, for benchmarks that share a machine: who used the cores, and how much others did.

Roles: this process's threads (by name: the main loop, the ingest thread, other
Python threads, native threads), every process it started (by /proc parentage:
the learner and evaluator actors, the reaper, Ray's own processes), and the
whole machine, whose busy time minus all of those is what other users took.
"""

import contextlib
import os
import threading
import time

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(path: str) -> tuple[int, str, float] | None:
    """(parent pid, comm, cpu seconds) from a /proc stat file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    head, rest = raw.rsplit(b")", 1)
    fields = rest.split()
    return int(fields[1]), head.split(b"(", 1)[1].decode(errors="replace"), (int(fields[11]) + int(fields[12])) / TICK


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _role(pid: int, comm: str) -> str:
    cmd = _cmdline(pid)
    if "ray::Learner" in cmd or comm.startswith("ray::Learner"):
        return "learner actor"
    if "ray::Evaluator" in cmd or comm.startswith("ray::Evaluator"):
        return "evaluator actor"
    if "reaper.py" in cmd:
        return "reaper"
    return "Ray system (gcs, raylet, agents, idle workers)"


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, idle and iowait excluded)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return (sum(parts[:8]) - parts[3] - parts[4]) / TICK


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far by role: this process's threads, and every process it started (by /proc parentage)."""
    me = os.getpid()
    out: dict[str, float] = {}
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    main_tid = threading.main_thread().native_id
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{me}/task"):
            st = _stat(f"/proc/{me}/task/{tid}/stat")
            if st is None:
                continue
            name = names.get(int(tid))
            if int(tid) == main_tid:
                role = "driver: main loop thread"
            elif name == "everlearn-ingest":
                role = "driver: ingest thread"
            elif name is not None:
                role = "driver: other Python threads"
            else:
                role = "driver: native threads (Ray core worker, torch)"
            out[role] = out.get(role, 0.0) + st[2]
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, float]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(f"/proc/{name}/stat")
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
                info[int(name)] = (st[1], st[2])
    todo, seen = [me], set()
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
                role = _role(child, info[child][0])
                out[role] = out.get(role, 0.0) + info[child][1]
    out["machine (all processes)"] = machine_busy()
    return out


def cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """CPU seconds used between two snapshots; a process that started in between counts from 0, one that ended is lost."""
    d = {k: max(0.0, b.get(k, 0.0) - a.get(k, 0.0)) for k in sorted(a.keys() | b.keys())}
    ours = sum(v for k, v in d.items() if k != "machine (all processes)")
    d["outside this benchmark"] = max(0.0, d.get("machine (all processes)", 0.0) - ours)
    return d


def outside_cores(interval_s: float) -> float:
    """Cores kept busy by processes other than this benchmark's over ``interval_s`` (other users, the kernel)."""
    a, t0 = cpu_snapshot(), time.perf_counter()
    time.sleep(interval_s)
    d = cpu_delta(a, cpu_snapshot())
    return d["outside this benchmark"] / (time.perf_counter() - t0)


def wait_quiet(below: float, timeout_s: float) -> tuple[float, float]:
    """Wait until other processes use less than ``below`` cores (3 s samples), at most ``timeout_s``; (waited s, last sample)."""
    t0 = time.perf_counter()
    busy = outside_cores(3.0)
    while busy >= below and time.perf_counter() - t0 < timeout_s:
        busy = outside_cores(3.0)
    return time.perf_counter() - t0, busy
