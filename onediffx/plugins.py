"""Loading plugins: named first-party modules in ``plugins/`` and installed entry points.

A plugin is a module that registers stages or compile backends on import. Configs name plugins,
never import paths: ``plugins: [vae_tiling]`` loads ``plugins/vae_tiling.py`` from this
repository, or the entry point called ``vae_tiling`` in the ``onediffx.plugins`` group of an
installed package. That keeps YAML from importing arbitrary Python while letting any package
extend the registry the way pytest plugins do.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from .errors import ConfigError

ENTRY_POINT_GROUP = "onediffx.plugins"
FIRST_PARTY_DIR = Path(__file__).resolve().parent.parent / "plugins"


def first_party_plugins() -> dict[str, Path]:
    """Plugin modules shipped in the repository's ``plugins/`` folder."""
    if not FIRST_PARTY_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(FIRST_PARTY_DIR.glob("*.py")) if not p.stem.startswith("_")}


def installed_plugins() -> dict[str, object]:
    """Entry points that installed packages declare in the ``onediffx.plugins`` group."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _import_file(name: str, path: Path) -> ModuleType:
    module_name = f"onediffx_plugins.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def load_plugin(name: str) -> ModuleType:
    """Import the plugin called ``name`` (entry points win over first-party files)."""
    installed = installed_plugins()
    if name in installed:
        return installed[name].load()
    local = first_party_plugins()
    if name in local:
        return _import_file(name, local[name])
    known = ", ".join(sorted({*installed, *local})) or "none"
    raise ConfigError(f"plugins: unknown plugin {name!r}; available: {known}")


def load_plugins(names) -> None:
    """Load every plugin a config lists."""
    for name in names:
        load_plugin(name)


def load_all_plugins() -> None:
    """Load all installed and first-party plugins, so that lookups by stage name can find theirs."""
    for name in {*installed_plugins(), *first_party_plugins()}:
        load_plugin(name)
