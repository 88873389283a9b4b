"""Reproducible installs: constraints.txt pins a version inside every range pyproject.toml declares, names no
torch (CPU commands name it, GPU users keep their CUDA build), and README's two commands and .ci/run use it."""

from __future__ import annotations

import os
import re

import pytest

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: '{line}' is not name==version"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_declared_dependency_is_pinned_inside_its_range():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    pins = _pins()
    assert "torch" not in pins and not any(n.startswith("nvidia-") for n in pins)
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"constraints.txt has no pin for {req.name} (bash .ci/lock rewrites it)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"


def test_readme_commands_and_ci_install_with_the_constraints():
    readme = (REPO / "README.md").read_text()
    cmds = re.findall(r"^python3 -m venv \.venv && (.+)$", readme, flags=re.M)
    assert len(cmds) >= 2, cmds
    command2 = next(c for c in cmds if "python -m pytest" in c)
    assert "-c constraints.txt" in command2 and "torch==2.13.0" in command2
    assert any("-c constraints.txt" in c and c.endswith("python -m orchestrator") for c in cmds), cmds
    ci = (REPO / ".ci" / "run").read_text()
    assert command2.strip() in ci, "`.ci/run` runs README command 2 as written"


def test_each_xdist_worker_gets_its_share_of_the_cores(monkeypatch):
    """The suite's 2 xdist workers share the machine's cores instead of each running torch on all of them
    (tests/conftest.py); outside xdist nothing is changed."""
    from conftest import _threads_per_xdist_worker

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert _threads_per_xdist_worker() == max(1, cores // 2)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(4 * cores))
    assert _threads_per_xdist_worker() == 1
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert _threads_per_xdist_worker() == 0
