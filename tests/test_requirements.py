"""The tested version range: a package below its minimum is one line naming it, before anything runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from onediffx import requirements
from onediffx.errors import OnediffxError

REPO = Path(__file__).resolve().parent.parent


def test_what_is_installed_here_meets_the_minimums():
    assert requirements.problems() == []


def test_a_package_below_its_minimum_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(requirements, "MINIMUMS", {"diffusers": "99.0", "torch": "2.0", "no-such-package-x": "1"})
    requirements.check.cache_clear()
    try:
        with pytest.raises(OnediffxError) as err:
            requirements.check()
    finally:
        requirements.check.cache_clear()
    message = str(err.value)
    assert "diffusers" in message and "is older than 99.0" in message and "torch" not in message.split(";")[0]
    assert "no-such-package-x is not installed (needs >= 1)" in message
    assert "pip install -U 'diffusers>=99.0'" in message and "\n" not in message
    assert isinstance(err.value, ImportError)


def test_pyproject_declares_the_same_minimums():
    declared = {}
    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(line)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        declared[req.name] = lower[0] if lower else None
    for name, minimum in requirements.MINIMUMS.items():
        assert declared.get(name) == minimum, (name, declared.get(name), minimum)


def test_a_pair_pip_does_not_know_is_checked(monkeypatch):
    """peft 0.17 with transformers 5 fails on import inside diffusers; say so up front."""
    versions = {"transformers": "5.1.0", "peft": "0.17.1"}
    monkeypatch.setattr(requirements, "_installed", lambda name: Version(versions[name]) if name in versions else None)
    assert requirements._pair_problems() == ["peft 0.17.1 is older than 0.18, which transformers 5.1.0 needs"]
    versions["transformers"] = "4.57.0"
    assert requirements._pair_problems() == []
