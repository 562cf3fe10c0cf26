"""Packaging: the wheel's package list is complete, and configs and plugins resolve inside the package.

The installed-wheel check itself (build, fresh venv, run from an empty folder) is ``make wheel-check``,
which CI runs after the suite.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from onediffx import plugin_loader, resources

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_of_the_tree_is_in_the_wheel():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "onediffx").rglob("__init__.py")}
    assert found - listed == set()
    assert {"onediffx.conf", "onediffx.plugins"} <= listed


def test_conf_and_plugins_ship_as_package_folders():
    package_dir = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert package_dir == {"onediffx.conf": "conf", "onediffx.plugins": "plugins"}
    assert (resources.conf_dir() / "run.yaml").is_file()
    assert resources.conf_dir().resolve() == (REPO / "conf").resolve()
    assert "vae_tiling" in plugin_loader.first_party_plugins()


def test_a_plugins_folder_beside_the_package_is_never_read(tmp_path, monkeypatch):
    """Only the onediffx.plugins package is looked at: a stray folder of .py files is not a plugin source."""
    stray = tmp_path / "plugins"
    stray.mkdir()
    (stray / "evil.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "evil" not in plugin_loader.first_party_plugins()


def test_a_checkout_is_bound_only_when_it_is_onediffx(tmp_path, monkeypatch):
    fake = tmp_path / "site"
    (fake / "conf").mkdir(parents=True)
    (fake / "conf" / "__init__.py").write_text("")
    (fake / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    monkeypatch.setattr(resources, "__file__", str(fake / "onediffx" / "resources.py"))
    assert resources._checkout_folder("conf") is None
    (fake / "pyproject.toml").write_text('[project]\nname = "onediffx"\n')
    assert resources._checkout_folder("conf") == fake / "conf"
