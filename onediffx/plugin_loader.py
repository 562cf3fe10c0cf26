"""Loading plugins: the first-party modules of ``onediffx.plugins`` and installed entry points.

A plugin is a module that registers stages or compile backends on import. Configs name plugins,
never import paths: ``plugins: [vae_tiling]`` imports ``onediffx.plugins.vae_tiling`` (the
repository's ``plugins/`` folder, shipped inside the package), or the entry point called
``vae_tiling`` in the ``onediffx.plugins`` group of an installed package. Nothing else is looked
at, so YAML never imports arbitrary Python, and a stray ``plugins/`` folder beside
``site-packages`` is never read.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from importlib.metadata import entry_points
from types import ModuleType

from .errors import ConfigError
from .resources import PLUGINS, plugins_dir

ENTRY_POINT_GROUP = "onediffx.plugins"


def first_party_plugins() -> list[str]:
    """Names of the plugin modules shipped in ``onediffx.plugins``."""
    return sorted(m.name for m in pkgutil.iter_modules([str(plugins_dir())]) if not m.name.startswith("_"))


def installed_plugins() -> dict[str, object]:
    """Entry points that installed packages declare in the ``onediffx.plugins`` group."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


@lru_cache(maxsize=None)
def load_plugin(name: str) -> ModuleType:
    """Import the plugin called ``name`` (entry points win over first-party modules)."""
    installed = installed_plugins()
    if name in installed:
        return installed[name].load()
    local = first_party_plugins()
    if name in local:
        return importlib.import_module(f"{PLUGINS}.{name}")
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
