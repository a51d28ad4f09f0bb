"""`everlearn gates explain`: the audit records of one version or one step, readable, from the run's audit log."""

import json
import os

import pytest
import yaml

from everlearn.daemon import cli
from everlearn.deploy.audit import AuditLog

pytestmark = pytest.mark.unit

JUDGED = {"step": 50, "verdict": "promoted", "promoted_version": 1, "passed": True, "serving_version": 0,
          "reason": "passed all 6 gates: fresh loss down 3.30% (lower bound +2.08% >= 1.00%)",
          "metrics": {"gates": [{"name": "sanity", "passed": True, "reason": "sanity: weights and losses finite"},
                                {"name": "improvement", "passed": True, "reason": "improvement: fresh loss down 3.30%"}],
                      "improvement": {"estimate": 0.033, "lower": 0.0208, "upper": 0.045, "threshold": 0.01}}}
REJECTED = {"step": 100, "verdict": "rejected", "passed": False, "serving_version": 1,
            "reason": "forgetting: vs serving, on the frozen probe set the candidate's old loss is up +9.50%",
            "metrics": {"gates": [{"name": "forgetting", "passed": False, "reason": "forgetting: vs serving, on the frozen probe set ..."}]}}
ROLLED = {"verdict": "rolled_back", "trigger": "auto", "rolled_back_from": 2, "serving_version": 1, "decision_id": "abc",
          "reason": "post-swap loss regression of version 2: ..."}


@pytest.fixture
def run(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("EVERLEARN_")]:
        monkeypatch.delenv(key)
    audit = AuditLog(tmp_path / "run" / "audit.jsonl")
    for record in (JUDGED, REJECTED, {**JUDGED, "step": 150, "promoted_version": 2}, ROLLED):
        audit.append(record)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run")}))
    return config


def test_a_version_prints_its_promotion_with_every_gate(run, capsys):
    assert cli.main(["gates", "explain", "1", "-c", str(run)]) == 0
    out = capsys.readouterr().out
    assert "passed all 6 gates" in out and "improvement: fresh loss down 3.30%" in out
    assert "+2.08%" in out and "step 150" not in out


def test_a_version_rolled_back_shows_the_rollback_too(run, capsys):
    assert cli.main(["gates", "explain", "2", "-c", str(run)]) == 0
    out = capsys.readouterr().out
    assert "post-swap loss regression of version 2" in out and "passed all 6 gates" in out


def test_a_rejected_candidate_is_found_by_its_step(run, capsys):
    assert cli.main(["gates", "explain", "--step", "100", "-c", str(run), "--json"]) == 0
    (record,) = [json.loads(chunk) for chunk in capsys.readouterr().out.strip().split("\n\n")]
    assert record["verdict"] == "rejected" and record["metrics"]["gates"][0]["passed"] is False


def test_an_unknown_version_says_which_exist(run, capsys):
    assert cli.main(["gates", "explain", "7", "-c", str(run)]) == 1
    err = capsys.readouterr().err
    assert "no decision about version 7" in err and "promoted versions: [1, 2]" in err


def test_no_version_and_no_step_is_a_usage_error(run, capsys):
    with pytest.raises(SystemExit):
        cli.main(["gates", "explain", "-c", str(run)])
    assert "needs a VERSION or --step" in capsys.readouterr().err
