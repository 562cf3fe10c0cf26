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
    """``conf/<group>/<name>.yaml`` as a config node; a ``ConfigError`` naming the presets if unknown."""
    names = preset_names(group)
    if name not in names:
        raise ConfigError(f"{group}: unknown preset {name!r}; presets: {', '.join(names) or 'none'}")
    node = OmegaConf.load(conf_dir() / group / f"{name}.yaml")
    assert isinstance(node, DictConfig)
    return node
