"""pyproject.toml: every architecture folder is installed under the one `everlearn` namespace."""

import importlib
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGES = SETUPTOOLS["packages"]
PACKAGE_DIR = SETUPTOOLS["package-dir"]

# Not part of the distribution: environments, tests, build output, caches.
NOT_PACKAGES = {".venv", "venv", "tests", "build", "dist", "runs", "node_modules", "__pycache__"}
BARE_NAMES = ("daemon", "buffers", "learners", "deploy")
_NAMES = "|".join(BARE_NAMES)
BARE_IMPORT = re.compile(
    rf"^\s*(?:import\s+(?:[\w.]+(?:\s+as\s+\w+)?\s*,\s*)*(?:{_NAMES})\b"
    rf"|from\s+(?:{_NAMES})(?:\.[\w.]+)?\s+import\b)"
)


def _skipped(rel: Path) -> bool:
    first = rel.parts[0]
    return first in NOT_PACKAGES or first.startswith(".") or first.endswith(".egg-info")


def _top_level_package_folders() -> list[str]:
    return sorted(p.name for p in REPO.iterdir() if p.is_dir() and not _skipped(Path(p.name)) and (p / "__init__.py").exists())


def _python_files() -> list[Path]:
    out = []
    for p in REPO.rglob("*.py"):
        rel = p.relative_to(REPO)
        if rel.parts[0] in {".venv", "venv", "build", "dist"} or rel.parts[0].startswith(".") or "__pycache__" in rel.parts:
            continue
        out.append(p)
    return sorted(out)


def test_the_expected_folders_exist():
    assert {"daemon", "buffers", "learners", "deploy", "everlearn"} <= set(_top_level_package_folders())


def test_every_folder_with_init_is_a_listed_package():
    by_dir = {Path(d).as_posix().rstrip("/"): pkg for pkg, d in PACKAGE_DIR.items()}
    missing = [f for f in _top_level_package_folders() if f not in by_dir or by_dir[f] not in PACKAGES]
    assert missing == [], f"add these folders to [tool.setuptools] packages and package-dir: {missing}"


def test_every_subfolder_with_init_is_a_listed_package():
    """A subpackage (e.g. daemon/sources/) is not found by an explicit packages list either."""
    listed_dirs = {Path(d).as_posix().rstrip("/") for d in PACKAGE_DIR.values()}
    missing = []
    for top in _top_level_package_folders():
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO).as_posix()
            if rel not in listed_dirs and "__pycache__" not in rel:
                missing.append(rel)
    assert missing == []


def test_package_dir_targets_exist_and_are_packages():
    for pkg, d in PACKAGE_DIR.items():
        target = REPO / d
        assert target.is_dir(), f"{pkg} -> {d}: no such folder"
        assert (target / "__init__.py").exists(), f"{pkg} -> {d}: no __init__.py"


def test_packages_and_package_dir_agree():
    assert sorted(PACKAGES) == sorted(PACKAGE_DIR)
    assert len(set(PACKAGES)) == len(PACKAGES)
    assert all(p == "everlearn" or p.startswith("everlearn.") for p in PACKAGES)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_listed_packages_import_from_their_folder(pkg):
    mod = importlib.import_module(pkg)
    assert Path(mod.__file__).resolve().parent == (REPO / PACKAGE_DIR[pkg]).resolve()


def test_bare_import_pattern():
    bad = ["import daemon", "import daemon.config", "from daemon import x", "from deploy.gates import LossGate",
           "    import buffers", "from learners import model", "import learners as l", "import os, deploy",
           "import numpy as np, buffers.reservoir"]
    good = ["import everlearn.daemon", "from everlearn.deploy import x", "import daemonize", "from buffers_x import y",
            "# import daemon", "x = 'from daemon import y'", "from . import daemon"]
    assert [b for b in bad if not BARE_IMPORT.search(b)] == []
    assert [g for g in good if BARE_IMPORT.search(g)] == []


def test_no_bare_imports_of_the_folders():
    offenders = []
    files = _python_files()
    assert files, "no Python files found"
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if BARE_IMPORT.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == [], "import through the namespace (everlearn.daemon, ...):\n" + "\n".join(offenders)


def test_ruff_bans_the_bare_names():
    banned = PYPROJECT["tool"]["ruff"]["lint"]["flake8-tidy-imports"]["banned-api"]
    assert set(BARE_NAMES) <= set(banned)


def test_console_script_points_to_an_importable_callable():
    target = PYPROJECT["project"]["scripts"]["everlearn"]
    module, _, attr = target.partition(":")
    assert module and attr, target
    fn = getattr(importlib.import_module(module), attr)
    assert callable(fn)


def test_installed_entry_point_matches_pyproject():
    eps = importlib.metadata.entry_points(group="console_scripts", name="everlearn")
    assert [ep.value for ep in eps] == [PYPROJECT["project"]["scripts"]["everlearn"]]
    assert callable(next(iter(eps)).load())


def test_console_script_shows_help(capsys):
    from everlearn.daemon.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "status", "validate"):
        assert cmd in out
