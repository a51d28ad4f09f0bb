"""Failpoints: named places where a test makes the process fail on purpose.

``EVERLEARN_FAILPOINTS`` lists ``name=action`` pairs, comma separated, each
optionally with the hits it fires on: ``name@3=kill`` (the third time only),
``name@2-4=nan`` (hits 2 to 4), ``name@5-=raise`` (the fifth and every later),
``name@3|7-9=nan`` (hits 3 and 7 to 9). Without ``@`` a failpoint fires on every hit.

    kill    SIGKILL this process on the spot (no cleanup, no finally: a crash)
    raise   raise FailpointError (an unexpected bug in that place)
    other   returned to the call site, which interprets it (e.g. ``nan``)

Unset (production), ``hit`` is one dict lookup. Reliability tests set the
variable for one daemon process and check what a restart makes of the wreck.
"""

import os
import signal
import threading

ENV = "EVERLEARN_FAILPOINTS"


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is ``raise``."""


def _parse(spec: str) -> dict[str, tuple[list[tuple[int, float]], str]]:
    rules: dict[str, tuple[list[tuple[int, float]], str]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        name, _, hits = name.partition("@")
        ranges: list[tuple[int, float]] = []
        for part in hits.split("|") if hits else ["1-"]:
            first, dash, last = part.partition("-")
            lo = int(first)
            ranges.append((lo, (float(last) if last else float("inf")) if dash else lo))
        rules[name.strip()] = (ranges, action.strip() or "kill")
    return rules


_rules = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}
_lock = threading.Lock()


def reload(spec: str | None = None) -> None:
    """Re-read the rules (tests in one process); hit counts restart from zero."""
    global _rules
    with _lock:
        _rules = _parse(os.environ.get(ENV, "") if spec is None else spec)
        _hits.clear()


def hit(name: str) -> str | None:
    """Count one pass through ``name``; act if a rule fires, else return None."""
    if not _rules or name not in _rules:
        return None
    with _lock:
        n = _hits[name] = _hits.get(name, 0) + 1
    ranges, action = _rules[name]
    if not any(lo <= n <= hi for lo, hi in ranges):
        return None
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        raise FailpointError(f"failpoint {name} (hit {n})")
    return action
