"""Running the real `everlearn` CLI as a user would, and reading what it leaves behind."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

EVERLEARN = [sys.executable, "-m", "everlearn.daemon"]


def tiny_config(tmp: Path, serve_port: int, metrics_port: int, **sections: Any) -> Path:
    """A config small enough for a 2-core machine: a 2-layer Llama of width 64, steps of ~0.1 s."""
    cfg: dict[str, Any] = {
        "run_dir": str(tmp / "run"),
        "source": {"url": str(tmp / "stream"), "poll_interval_s": 0.2, "max_records_per_poll": 32},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128},
        "train": {"seq_len": 64, "batch_size": 8, "torch_threads": 1},
        "schedule": {"warmup_steps": 5, "cooldown_steps": 20, "peak_lr": 3e-3, "constant_lr": 1e-3, "min_lr": 1e-4},
        "buffer": {"capacity": 256},
        "holdout": {"fraction": 0.15, "fresh_capacity": 32, "old_capacity": 64},
        "checkpoint": {"every_steps": 10, "keep_last": 2},
        "gate": {"every_steps": 10},
        "serve": {"port": serve_port, "swap_timeout_s": 30},
        "metrics": {"port": metrics_port},
        "demo": {"seed_if_empty": False},
        "log": {"interval_s": 1.0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp / "stream").mkdir(exist_ok=True)
    return path


class DaemonProcess:
    """`everlearn run` in its own process group, output captured to a file."""

    def __init__(self, config: Path, *args: str, log: Path):
        self.log = log
        self._f = open(log, "ab")  # noqa: SIM115 (lives as long as the process)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([*EVERLEARN, "run", "-c", str(config), *args], stdout=self._f, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._f.flush()

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._f.close()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _json(req: urllib.request.Request | str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # it holds the open response: close it now, not when it is collected
        e.close()
        raise


def healthz_status(url: str) -> int:
    """The HTTP status /healthz answers on the daemon's metrics ``url`` (503 when degraded)."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def get_json(url: str, timeout: float = 5) -> Any:
    return _json(url, timeout)


def post_json(url: str, body: dict, timeout: float = 30) -> Any:
    return _json(urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}), timeout)


def wait_for(predicate, timeout: float, what: str, daemon: DaemonProcess | None = None, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited ({daemon.proc.returncode}) while waiting for {what}:\n{daemon.tail()}")
        try:
            value = predicate()
            if value:
                return value
        except OSError as e:
            last_exc = e
        time.sleep(interval)
    tail = daemon.tail() if daemon else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_exc})\n{tail}")


def run_in_process(config: Path, until: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 240,
                   max_steps: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``everlearn run`` in this process, on the Ray the test started: until ``until(status)`` holds
    (then a clean stop, as SIGTERM makes one) or ``max_steps`` steps. Returns (final status, events)."""
    from prometheus_client import CollectorRegistry

    from everlearn.daemon.config import load_config
    from everlearn.daemon.service import Daemon

    out = io.StringIO()
    daemon = Daemon(load_config(config), registry=CollectorRegistry(), out=out)
    done, timed_out = threading.Event(), []

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not done.wait(0.2):
            if time.monotonic() > deadline:
                timed_out.append(daemon.state)
                break
            if until is not None and daemon.state not in ("starting", "stopping", "stopped") and until(daemon.status()):
                break
        daemon.stop_event.set()

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        final = daemon.run(max_steps=max_steps)
    finally:
        done.set()
        watcher.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    evs = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert not timed_out, f"timed out after {timeout} s (state: {timed_out[0]})\n{out.getvalue()[-3000:]}"
    return final, evs
