"""Retrying what fails for a while: exponential backoff with jitter, and what counts as transient.

A storage or broker outage must never end the daemon: the caller retries with
growing, randomised pauses (so many daemons do not retry in lockstep) and shows
``degraded`` once the outage has lasted a while. Errors that retrying cannot
fix (a bad URL, a damaged file, a bug) are not transient and surface at once.
"""

import random
import time
from collections.abc import Callable
from typing import TypeVar

from everlearn.errors import SourceUnavailable, StorageUnavailable

T = TypeVar("T")

# Exception class names from botocore / aiohttp / urllib3 that mean "the other side did not answer";
# matched by name so that this module imports none of them.
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ProxyConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
    "ClientPayloadError", "ServerTimeoutError", "IncompleteReadError", "ResponseStreamingError",
    "ProtocolError", "NewConnectionError", "MaxRetryError",
}
_PERMANENT_OS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """True when retrying later may succeed: timeouts, refused or reset connections, 5xx answers."""
    for e in _chain(exc):
        if isinstance(e, SourceUnavailable | StorageUnavailable | TimeoutError | ConnectionError):
            return True
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
        status = getattr(e, "response", None)
        if isinstance(status, dict):
            code = status.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code >= 500 or code == 429:
                return True
        if isinstance(e, OSError) and not isinstance(e, _PERMANENT_OS):
            return True  # s3fs turns most connection failures into plain OSErrors
    return False


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        # ``raise X from None`` suppresses the context: X alone is the error
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


class Backoff:
    """Pauses of ``base_s * 2**n``, capped at ``max_s``, each drawn uniformly between a quarter of that and that (jitter that never retries at once)."""

    def __init__(self, base_s: float = 0.5, max_s: float = 30.0, seed: int | None = None):
        self.base_s, self.max_s = base_s, max_s
        self.failures = 0
        self.first_failure: float | None = None
        self._rng = random.Random(seed)

    def next_delay(self, now: float | None = None) -> float:
        if self.first_failure is None:
            self.first_failure = time.monotonic() if now is None else now
        cap = min(self.max_s, self.base_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return self._rng.uniform(0.25 * cap, cap)  # never 0: a retry storm is what jitter is against

    def reset(self) -> None:
        self.failures = 0
        self.first_failure = None

    def failing_for(self, now: float | None = None) -> float:
        """Seconds since the first failure of the current run of failures (0 when healthy)."""
        if self.first_failure is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.first_failure


def retry(fn: Callable[[], T], *, timeout_s: float, backoff: Backoff | None = None,
          sleep: Callable[[float], object] = time.sleep, on_retry: Callable[[BaseException, float], None] | None = None) -> T:
    """``fn()``, retried on transient errors until ``timeout_s`` has passed; then the last error is raised."""
    backoff = backoff or Backoff()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = fn()
            backoff.reset()
            return result
        except Exception as e:
            if not is_transient(e):
                raise
            delay = backoff.next_delay()
            if time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(e, delay)
            sleep(delay)
