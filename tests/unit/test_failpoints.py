"""Failpoints (everlearn/failpoints.py): the hit specs, counting per name, the actions, reload."""

import os
import signal
import subprocess
import sys

import pytest

from everlearn import failpoints
from everlearn.failpoints import FailpointError

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_failpoints(no_failpoints):
    yield


def fired(name: str, hits: int) -> list[int]:
    """The hit numbers (1-based) on which ``name`` returned an action."""
    return [n for n in range(1, hits + 1) if failpoints.hit(name) is not None]


@pytest.mark.parametrize(("spec", "expected"), [
    ("p@3=nan", [3]),
    ("p@2-4=nan", [2, 3, 4]),
    ("p@5-=nan", [5, 6, 7, 8, 9, 10]),
    ("p@3|7-9=nan", [3, 7, 8, 9]),
    ("p@1|3|5-6=nan", [1, 3, 5, 6]),
    ("p=nan", list(range(1, 11))),  # no @: every hit
    (" p @ 2 = nan ", [2]),  # spaces around the parts are ignored
])
def test_hit_ranges(spec, expected):
    failpoints.reload(spec)
    assert fired("p", 10) == expected


def test_the_action_is_returned_to_the_call_site():
    failpoints.reload("p@2=damage")
    assert [failpoints.hit("p") for _ in range(3)] == [None, "damage", None]


def test_hits_are_counted_per_name():
    failpoints.reload("a@2=x,b@3=y")
    assert failpoints.hit("a") is None
    assert failpoints.hit("b") is None
    assert failpoints.hit("b") is None
    assert failpoints.hit("a") == "x"  # a's second hit, whatever b did meanwhile
    assert failpoints.hit("b") == "y"
    assert failpoints.hit("a") is None


def test_raise_raises_failpoint_error_naming_the_point_and_hit():
    failpoints.reload("checkpoint.begin@2=raise")
    assert failpoints.hit("checkpoint.begin") is None
    with pytest.raises(FailpointError, match=r"checkpoint\.begin \(hit 2\)"):
        failpoints.hit("checkpoint.begin")
    assert failpoints.hit("checkpoint.begin") is None
    assert issubclass(FailpointError, RuntimeError)


def test_unknown_names_and_no_rules_return_none():
    assert failpoints.hit("anything") is None  # nothing armed
    failpoints.reload("known=raise")
    assert [failpoints.hit("unknown") for _ in range(5)] == [None] * 5


def test_reload_replaces_rules_and_restarts_counts():
    failpoints.reload("p@2=x")
    assert fired("p", 1) == []  # one hit counted
    failpoints.reload("p@2=x")
    assert fired("p", 3) == [2]  # counting started again from zero
    failpoints.reload("q=y")
    assert failpoints.hit("p") is None  # the old rule is gone
    assert failpoints.hit("q") == "y"


def test_reload_without_a_spec_reads_the_environment(monkeypatch):
    monkeypatch.setenv(failpoints.ENV, "fromenv@2-3=nan")
    failpoints.reload()
    assert fired("fromenv", 4) == [2, 3]
    monkeypatch.delenv(failpoints.ENV)
    failpoints.reload()
    assert failpoints.hit("fromenv") is None


def test_the_environment_is_read_at_import():
    code = (
        "from everlearn import failpoints\n"
        "print([failpoints.hit('p') for _ in range(4)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, failpoints.ENV: "p@2|4=nan"},
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[None, 'nan', None, 'nan']"


def test_kill_sigkills_the_process_on_the_spot():
    code = (
        "import sys\n"
        "from everlearn import failpoints\n"
        "failpoints.reload('boom@2=kill')\n"
        "try:\n"
        "    for i in range(3):\n"
        "        print('hit', i, flush=True)\n"
        "        failpoints.hit('boom')\n"
        "finally:\n"
        "    print('finally ran', flush=True)\n"  # a crash runs no cleanup
        "print('survived', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split("\n")[:-1] == ["hit 0", "hit 1"]


def test_an_action_left_empty_means_kill():
    code = "from everlearn import failpoints\nfailpoints.reload('boom')\nfailpoints.hit('boom')\nprint('survived')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "survived" not in proc.stdout
