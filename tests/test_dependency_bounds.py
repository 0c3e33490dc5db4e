"""The dependency bounds in pyproject.toml are the tested ones: .ci/lowest-versions.txt pins exactly the
floors (CI runs a test subset with them), and the environment running the tests satisfies every bound."""

from __future__ import annotations

import os
import re
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def floors() -> dict[str, Version]:
    out = {}
    for text in project()["dependencies"]:
        req = Requirement(text)
        lower = [s.version for s in req.specifier if s.operator in (">=", "==")]
        assert lower, f"{text}: every dependency needs a floor"
        out[req.name.lower()] = Version(lower[0])
    return out


def pins() -> dict[str, Version]:
    out = {}
    with open(os.path.join(ROOT, ".ci", "lowest-versions.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = re.split(r"\s*==\s*", line)
                out[name.lower()] = Version(version)
    return out


def test_the_lowest_versions_ci_tests_are_the_declared_floors():
    declared, pinned = floors(), pins()
    torch_floor = declared.pop("torch")  # torch is installed first, from the CI disk (.ci/run)
    assert pinned == declared
    assert torch_floor <= Version(metadata.version("torch").split("+")[0])


def test_this_environment_satisfies_every_declared_bound():
    python = project()["requires-python"]
    assert Version(".".join(map(str, sys.version_info[:3]))) in Requirement(f"python{python}").specifier
    for text in project()["dependencies"]:
        req = Requirement(text)
        installed = Version(metadata.version(req.name).split("+")[0])
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is outside {req.specifier}"
