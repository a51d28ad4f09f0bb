"""Serving's own Prometheus metrics: counted in each replica, summed by the registry, exposed at GET /metrics.

A replica keeps cumulative counters since it started (``ReplicaMetrics``) and
sends a snapshot of them, plain JSON-able dicts, inside its heartbeat. The
registry sums the snapshots of every replica it knows and keeps the last
snapshot of each replica it forgets in a ``retired`` total, so the counters it
exposes only grow while it lives (``merge``). Any replica answers /metrics with
the registry's numbers (``exposition``): a scrape that lands on another replica
sees the same series.

Every label takes values from a fixed set: routes are the app's path templates
(anything else, a 404 included, is ``other``), codes are HTTP statuses, token
kinds, load outcomes and replica states are listed here. Ray's node metrics are
not used: promtool rejects them (camelCase labels, ``_ms`` units).

No Ray here: the registry actor, the replica and the tests all import this.
"""

import math
import threading
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

PREFIX = "everlearn_serving"
ROUTES = ("/score", "/generate", "/v1/completions", "/v1/models", "/version", "/healthz", "/metrics")
OTHER = "other"  # every path that is not one of ROUTES (no route, a wrong method): the label set stays bounded
TOKEN_KINDS = ("scored", "prompt", "generated")
LOAD_OUTCOMES = ("ok", "failed")
REPLICA_STATES = ("current", "stale", "failed", "empty")
# seconds: a 1-token /score answers in a few ms, 512 new tokens on a busy CPU core take ~20 s, Serve's timeout is 120 s
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# seconds: a LoRA adapter swaps in well under a second, a full model from an object store takes up to a minute
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def route_label(path: str) -> str:
    """A route's path template if it is one of ROUTES, else ``other``."""
    return path if path in ROUTES else OTHER


def empty_histogram(buckets: tuple[float, ...]) -> dict[str, Any]:
    """Cumulative counts per upper bound (``+Inf`` is ``count``), the sum of the observations, their count."""
    return {"buckets": [0] * len(buckets), "sum": 0.0, "count": 0}


def observe(histogram: dict[str, Any], bounds: tuple[float, ...], value: float) -> None:
    for i, bound in enumerate(bounds):
        if value <= bound:
            histogram["buckets"][i] += 1
    histogram["sum"] += value
    histogram["count"] += 1


def empty() -> dict[str, Any]:
    """A snapshot with nothing counted: the shape a replica reports and the registry sums."""
    return {"requests": {}, "request_seconds": {}, "tokens": dict.fromkeys(TOKEN_KINDS, 0), "loads": dict.fromkeys(LOAD_OUTCOMES, 0),
            "load_seconds": empty_histogram(LOAD_BUCKETS)}


def merge(total: dict[str, Any], part: dict[str, Any], sign: int = 1) -> dict[str, Any]:
    """Add snapshot ``part`` into ``total`` in place (``sign`` -1 takes it out): numbers add, lists (histogram
    buckets) add element by element, dicts recurse. Both have ``clean``'s shape: the registry cleans what it is sent."""
    for key, value in part.items():
        if isinstance(value, dict):
            merge(total.setdefault(key, {}), value, sign)
        elif isinstance(value, list):
            total[key] = [a + sign * b for a, b in zip(total.get(key) or [0] * len(value), value, strict=True)]
        else:
            total[key] = total.get(key, 0) + sign * value
    return total


RETIRED_IDS = 1024  # forgotten replicas whose counters can still be taken back out if they report again (a late heartbeat)


class Retired:
    """The last counters of every replica the registry forgot, summed (``total``): the totals it exposes never go
    down while it lives. The newest RETIRED_IDS are also kept by replica id, so a replica heard from again after it
    was forgotten is taken back out (``take``) rather than counted twice."""

    def __init__(self):
        self.total = empty()
        self.by_id: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def add(self, replica_id: str, metrics: dict[str, Any]) -> None:
        self.by_id[replica_id] = metrics
        merge(self.total, metrics)
        while len(self.by_id) > RETIRED_IDS:  # its counters stay in ``total``; only taking them back out is no longer possible
            self.by_id.popitem(last=False)

    def take(self, replica_id: str) -> dict[str, Any] | None:
        """Take a forgotten replica's counters back out of ``total``; returns them (None: it was not retired)."""
        metrics = self.by_id.pop(replica_id, None)
        if metrics is not None:
            merge(self.total, metrics, sign=-1)
        return metrics


def clean(part: Any) -> dict[str, Any]:
    """What a replica sent, kept only where it has this module's shape: known labels, numbers, histograms with these
    buckets. The registry sums only clean snapshots, so a replica of another version cannot break or skew the sum."""
    out = empty()
    if not isinstance(part, dict):
        return out

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    def histogram(h: Any, bounds: tuple[float, ...]) -> dict[str, Any] | None:
        if (isinstance(h, dict) and isinstance(h.get("buckets"), list) and len(h["buckets"]) == len(bounds)
                and all(number(c) for c in h["buckets"]) and number(h.get("sum")) and number(h.get("count"))):
            return {"buckets": list(h["buckets"]), "sum": h["sum"], "count": h["count"]}
        return None

    requests, seconds = part.get("requests"), part.get("request_seconds")
    for route in (*ROUTES, OTHER):
        codes = requests.get(route) if isinstance(requests, dict) else None
        if isinstance(codes, dict):
            kept = {c: n for c, n in codes.items() if isinstance(c, str) and len(c) == 3 and c.isdigit() and number(n)}
            if kept:
                out["requests"][route] = kept
        h = histogram(seconds.get(route), REQUEST_BUCKETS) if isinstance(seconds, dict) else None
        if h is not None:
            out["request_seconds"][route] = h
    for key, labels in (("tokens", TOKEN_KINDS), ("loads", LOAD_OUTCOMES)):
        given = part.get(key)
        if isinstance(given, dict):
            out[key].update({k: given[k] for k in labels if number(given.get(k))})
    out["load_seconds"] = histogram(part.get("load_seconds"), LOAD_BUCKETS) or out["load_seconds"]
    return out


def newest(a: Any, b: Any) -> Any:
    """The later of two snapshots of one replica's cumulative counters, in whichever order they arrived: their element-wise maximum."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: newest(a.get(k), b.get(k)) if k in a and k in b else (a[k] if k in a else b[k]) for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [newest(x, y) for x, y in zip(a, b, strict=True)]
    if isinstance(a, int | float) and isinstance(b, int | float):
        return max(a, b)
    return b


class ReplicaMetrics:
    """One replica's counters since it started. Called from the event loop, worker threads and the watcher thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data = empty()

    def answered(self, route: str, status: int, seconds: float) -> None:
        route = route_label(route)
        with self._lock:
            codes = self._data["requests"].setdefault(route, {})
            codes[str(status)] = codes.get(str(status), 0) + 1
            observe(self._data["request_seconds"].setdefault(route, empty_histogram(REQUEST_BUCKETS)), REQUEST_BUCKETS, max(seconds, 0.0))

    def tokens(self, **counts: int) -> None:
        """Tokens by kind (``scored``, ``prompt``, ``generated``)."""
        with self._lock:
            for kind, n in counts.items():
                if kind not in TOKEN_KINDS:
                    raise ValueError(f"unknown token kind {kind!r}; the kinds are {', '.join(TOKEN_KINDS)}")
                self._data["tokens"][kind] += int(n)

    def loaded(self, ok: bool, seconds: float | None = None) -> None:
        """A version load: its outcome, and for one that succeeded, how long it took."""
        with self._lock:
            self._data["loads"]["ok" if ok else "failed"] += 1
            if ok and seconds is not None:
                observe(self._data["load_seconds"], LOAD_BUCKETS, max(seconds, 0.0))

    def snapshot(self) -> dict[str, Any]:
        """A copy to send: nested dicts of numbers and lists, JSON-able and picklable."""
        with self._lock:
            return merge(empty(), self._data)


# -- the exposition ---------------------------------------------------------------------------------------

# "the last 5 s" is registry.FRESH_S (a test holds them equal): this module cannot import the registry, which imports it
HELP = {
    "requests": "HTTP requests answered by serving replicas, by route and status code.",
    "request_seconds": "Seconds from a request reaching its route to its response (for a stream: until its headers), by route.",
    "tokens": "Tokens processed by serving replicas, by kind: scored (predicted by /score), prompt and generated "
              "(/generate and /v1/completions, a completion's prompt counted once however many choices).",
    "loads": "Versions loaded by serving replicas (a whole model or a LoRA adapter), by outcome (ok, failed).",
    "load_seconds": "Seconds a serving replica took to load a version's weights (successful loads).",
    "replicas": "Live serving replicas (heard from in the last 5 s), by state: current (holds the promoted version), stale "
                "(holds another), failed (reports it cannot load the promoted version), empty (holds none yet).",
    "promoted_version": "Version number the serving registry holds as promoted (NaN when it holds none yet).",
    "version": "Lowest version number held by a live serving replica (NaN when none holds one).",
}


def _histogram_buckets(histogram: Any, bounds: tuple[float, ...]) -> tuple[list[tuple[str, float]], float] | None:
    if not isinstance(histogram, dict) or len(histogram.get("buckets") or ()) != len(bounds):
        return None
    buckets = [(floatToGoString(b), float(c)) for b, c in zip(bounds, histogram["buckets"], strict=True)]
    return [*buckets, ("+Inf", float(histogram.get("count", 0)))], float(histogram.get("sum", 0.0))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


class ServingCollector:
    """The families of one aggregate (``RegistryState.metrics()``); labels only from the fixed sets above."""

    def __init__(self, aggregate: dict[str, Any]):
        self.aggregate = aggregate

    def collect(self):
        counters = self.aggregate.get("counters") or empty()
        requests = CounterMetricFamily(f"{PREFIX}_requests", HELP["requests"], labels=["route", "code"])
        seconds = HistogramMetricFamily(f"{PREFIX}_request_seconds", HELP["request_seconds"], labels=["route"])
        for route in (*ROUTES, OTHER):
            codes = (counters.get("requests") or {}).get(route) or {}
            for code in sorted(c for c in codes if isinstance(c, str) and c.isdigit() and len(c) == 3):
                requests.add_metric([route, code], _number(codes[code]))
            histogram = _histogram_buckets((counters.get("request_seconds") or {}).get(route), REQUEST_BUCKETS)
            if histogram is not None:
                seconds.add_metric([route], *histogram)
        yield requests
        yield seconds
        tokens = CounterMetricFamily(f"{PREFIX}_tokens", HELP["tokens"], labels=["kind"])
        for kind in TOKEN_KINDS:
            tokens.add_metric([kind], _number((counters.get("tokens") or {}).get(kind, 0)))
        yield tokens
        loads = CounterMetricFamily(f"{PREFIX}_loads", HELP["loads"], labels=["outcome"])
        for outcome in LOAD_OUTCOMES:
            loads.add_metric([outcome], _number((counters.get("loads") or {}).get(outcome, 0)))
        yield loads
        load_seconds = HistogramMetricFamily(f"{PREFIX}_load_seconds", HELP["load_seconds"], labels=[])
        histogram = _histogram_buckets(counters.get("load_seconds"), LOAD_BUCKETS)
        load_seconds.add_metric([], *(histogram or _histogram_buckets(empty_histogram(LOAD_BUCKETS), LOAD_BUCKETS)))
        yield load_seconds
        replicas = GaugeMetricFamily(f"{PREFIX}_replicas", HELP["replicas"], labels=["state"])
        for state in REPLICA_STATES:
            replicas.add_metric([state], _number((self.aggregate.get("replicas") or {}).get(state, 0)))
        yield replicas
        yield GaugeMetricFamily(f"{PREFIX}_promoted_version", HELP["promoted_version"], value=_number(self.aggregate.get("promoted_version")))
        yield GaugeMetricFamily(f"{PREFIX}_version", HELP["version"], value=_number(self.aggregate.get("lowest_version")))


def exposition(aggregate: dict[str, Any]) -> bytes:
    """Prometheus text exposition of one aggregate, on a registry of its own (never the process's global one)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ServingCollector(aggregate))
    return generate_latest(registry)
