"""The README's metrics tables are what the daemon and serving expose: every family, its type and labels; names in base units."""

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from everlearn.daemon.metrics import Metrics
from everlearn.deploy import serving_metrics as sm

pytestmark = pytest.mark.unit

README = (Path(__file__).parents[2] / "README.md").read_text()
UNIT_SUFFIXES = ("_seconds", "_bytes", "_ms", "_milliseconds", "_minutes", "_hours", "_kb", "_mb")


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """{metric: (type, labels)} from the rows of the README's Metrics section."""
    section = README[README.index("## Metrics") : README.index("\n## ", README.index("## Metrics") + 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`everlearn_"):
            labels = frozenset(re.findall(r"`(\w+)`", cells[2]))
            assert cells[0].strip("`") not in rows, f"{cells[0]} is documented twice"
            assert cells[3], f"{cells[0]} has no meaning"
            rows[cells[0].strip("`")] = (cells[1], labels)
    return rows


def exposed(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + ("_total" if fam.type == "counter" else "")
        out[name] = (fam.type, frozenset(k for s in fam.samples for k in s.labels) - {"le"})
    return out


def daemon_exposition() -> str:
    """Every family with a sample: labelled ones get one child each, so their label names show."""
    m = Metrics(CollectorRegistry())
    for obj in vars(m).values():
        names = getattr(obj, "_labelnames", ())
        if names:
            obj.labels(*["x"] * len(names))
    return generate_latest(m.registry).decode()


def serving_exposition() -> str:
    replica = sm.ReplicaMetrics()
    for route, code in (("/score", 200), ("/generate", 400)):
        replica.answered(route, code, 0.01)
    counters = sm.merge(sm.empty(), replica.snapshot())
    return sm.exposition({"counters": counters, "replicas": dict.fromkeys(sm.REPLICA_STATES, 1), "promoted_version": 2,
                       "lowest_version": 2, "known": 1}).decode()


def test_every_exposed_metric_is_documented_with_its_type_and_labels_and_nothing_else_is():
    doc = documented()
    live = exposed(daemon_exposition()) | exposed(serving_exposition())
    assert set(live) - set(doc) == set(), "exposed but not in the README's Metrics section"
    assert set(doc) - set(live) == set(), "in the README but not exposed"
    assert {k: v for k, v in live.items() if doc[k] != v} == {}, "type or labels differ from the README"


def test_names_use_base_units_and_counters_end_in_total():
    for name, (kind, _) in documented().items():
        assert kind in ("counter", "gauge", "histogram"), name
        assert (kind == "counter") == name.endswith("_total"), name
        base = name.removesuffix("_total")
        assert not base.endswith(UNIT_SUFFIXES[2:]), f"{name}: use base units (seconds, bytes)"
        assert "_seconds_" not in name.replace("_seconds_total", ""), name
