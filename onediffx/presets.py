"""Presets of the packaged config groups (``conf/<group>/<name>.yaml``), for Python callers.

The CLI composes these files through Hydra; library code that wants the same presets without
Hydra's app (``compile_options("inductor")``) reads them here, from the package's own config
folder, so the library and the CLI can never disagree about what a preset means.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .resources import conf_dir


def preset_names(group: str) -> list[str]:
    """The presets of one config group, e.g. ``preset_names("compile")``."""
    folder = conf_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_preset(group: str, name: str) -> DictConfig:
    """``conf/<group>/<name>.yaml`` as a config node; a ``ConfigError`` naming the presets if unknown.

    A preset that extends others of its group (``defaults: [inductor, _self_]``, as Hydra composes
    it) is merged over them here too, so the library reads what the CLI composes.
    """
    names = preset_names(group)
    if name not in names:
        raise ConfigError(f"{group}: unknown preset {name!r}; presets: {', '.join(names) or 'none'}")
    node = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    assert isinstance(node, DictConfig)
    defaults = list(node.pop("defaults", []))
    if (defaults and defaults[-1] != "_self_") or any(not isinstance(d, str) for d in defaults):
        raise ConfigError(f"conf/{group}/{name}.yaml: defaults may list only presets of {group}, then _self_ last")
    return OmegaConf.merge(*[load_preset(group, base) for base in defaults[:-1]], node)
