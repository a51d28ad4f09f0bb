"""The `everlearn` command line: help, status without a daemon, bad flags."""

import pytest

from everlearn.daemon.cli import build_parser, main
from tests.conftest import free_port

pytestmark = pytest.mark.unit


def test_subcommands_are_listed():
    text = build_parser().format_help()
    for cmd in ("run", "status", "validate"):
        assert cmd in text


def test_status_without_a_daemon_says_what_to_do(capsys):
    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "no everlearn daemon answers" in err and "everlearn run" in err


def test_bad_set_override_is_a_config_error(capsys):
    assert main(["validate", "--set", "gate.every_steps"]) == 2
    assert "expected key.path=value" in capsys.readouterr().err


def test_validate_show_prints_the_resolved_config(capsys):
    assert main(["validate", "--show", "--set", "serve.port=8123"]) == 0
    assert "port: 8123" in capsys.readouterr().out


def test_reading_a_config_loads_neither_torch_nor_ray():
    """`everlearn status` and `validate` answer at once: the packages import their heavy parts on first use."""
    import subprocess
    import sys

    code = ("import sys; from everlearn.daemon.config import load_config; load_config(env={}); "
            "from everlearn.daemon import cli; "
            "heavy = sorted(m for m in ('torch', 'ray', 'transformers', 'kafka') if m in sys.modules); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
