"""The process around a run: Ray, signals, the stop deadline.

A local Ray started here is owned by this process, and the reaper
(daemon/reaper.py) makes sure its processes die with it, even after a
``kill -9``. ``ray.address`` joins an existing cluster instead, which outlives
the daemon.

SIGTERM / SIGINT ask for a clean stop: the loop ends, a final checkpoint is
written, the daemon exits 0. The stop has a deadline (``supervision.stop_grace_s``
plus a margin): past it the process exits 1 on its own, so an orchestrator
never has to kill a daemon stuck on unreachable storage. A second signal
exits at once.
"""

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import ray

from everlearn.daemon import reaper
from everlearn.daemon.config import Config
from everlearn.errors import ConfigError, EverlearnError

_reaper = None  # the reaper of this process's local Ray; lives as long as the process

HARD_EXIT_MARGIN_S = 15.0  # after the grace period: time to shut Ray and serving down


def start_ray(cfg: Config, signals: "StopSignals | None" = None) -> bool:
    """Start (or join) Ray; True when this process started it and owns it.

    ``signals``: the daemon's stop handlers, installed already (a stop ends a wait for the cluster)
    and installed again once Ray is up, because ``ray.init`` puts in a SIGTERM handler of its own.
    """
    if ray.is_initialized():
        return False
    rc = cfg.ray
    if rc.address:
        join_ray(rc.address, rc.connect_timeout_s, signals.event if signals else (lambda *a, **k: None),
                 signals.stop if signals else threading.Event())
        owned = False
    else:
        global _reaper
        _reaper = _reaper or reaper.start()
        before = reaper.children(os.getpid())
        ray.init(num_cpus=rc.num_cpus, object_store_memory=rc.object_store_memory_mb * 2**20,
                 include_dashboard=rc.include_dashboard, log_to_driver=False, configure_logging=False)
        reaper.watch(_reaper, reaper.children(os.getpid()) - before - {_reaper.pid})  # the processes Ray started
        owned = True
    if signals is not None:
        signals.install()
    return owned


def join_ray(address: str, timeout_s: float, event: Callable[..., None], stop: threading.Event) -> None:
    """Join the cluster at ``address``, waiting up to ``timeout_s`` for it to come up.

    In a pod beside the Ray head (the Helm chart), the daemon can start before the
    head has: ``auto`` then finds no cluster yet, and the daemon waits instead of
    crash-looping. A stop signal ends the wait.
    """
    t0, pause = time.monotonic(), 1.0
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            return
        except ConnectionError as e:
            waited = time.monotonic() - t0
            if stop.is_set():
                raise EverlearnError(f"stopped while waiting for the Ray cluster at ray.address={address!r}") from None
            if waited + pause > timeout_s:
                raise ConfigError(f"cannot join the Ray cluster at ray.address={address!r} after {waited:.0f} s: {e} "
                                  "Is its head running, and is this the right address? (`auto` needs this host's Ray session "
                                  "directory: in the Helm chart the daemon shares /tmp with the Ray head; ray.connect_timeout_s "
                                  "sets how long to wait)") from None
            event("waiting_for_ray", address=address, waited_s=round(waited, 1), error=str(e)[:200])
            stop.wait(pause)
            pause = min(pause * 2, 10.0)


def stop_ray() -> None:
    """Shut the local Ray down, then let the reaper finish off whatever outlived it and exit."""
    global _reaper
    ray.shutdown()
    if _reaper is not None:
        _reaper.stdin.close()  # end of file: the reaper kills what is left and exits
        try:
            _reaper.wait(10)
        except subprocess.TimeoutExpired:
            _reaper.kill()
            _reaper.wait(5)
        _reaper = None


class LoopWatch:
    """When the supervisor's loop last turned; ``problems`` is /livez's answer: empty while it turns (or has
    not started: startup is the startup probe's business), a restart being the cure otherwise."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.timeout_s, self.clock = timeout_s, clock
        self.last: float | None = None

    def tick(self) -> None:
        self.last = self.clock()

    def problems(self) -> list[str]:
        stuck = None if self.last is None else self.clock() - self.last
        if stuck is None or stuck <= self.timeout_s:
            return []
        return [f"the supervisor loop has not turned for {stuck:.0f} s (supervision.liveness_timeout_s={self.timeout_s:g})"]


class StopSignals:
    """Turns SIGINT/SIGTERM into ``stop.set()``; arms the hard deadline; a second signal exits now."""

    def __init__(self, stop: threading.Event, grace_s: float, event: Callable[..., None]):
        self.stop, self.grace_s, self.event = stop, grace_s, event
        self.signals = 0

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals > 1:
            self.event("stopping_now", signal=name)
            os._exit(130)
        self.event("stopping", signal=name, grace_s=self.grace_s)
        self.stop.set()
        self.arm_deadline()

    def arm_deadline(self) -> None:
        def expire():
            time.sleep(self.grace_s + HARD_EXIT_MARGIN_S)
            self.event("stop_deadline", message=f"the stop took longer than supervision.stop_grace_s={self.grace_s} s "
                                                "(+ a margin); exiting without a final checkpoint")
            os._exit(1)

        threading.Thread(target=expire, name="everlearn-stop-deadline", daemon=True).start()
