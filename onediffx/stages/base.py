"""The stage contract.

A stage is one named, ordered change to an assembled pipeline, the thin config adapter of one
library capability. It declares what it reads and where it stands, and ``plan()`` acts on both
once, before any weights load (so a typo or a misordered list costs nothing):

- ``group`` is the config key it reads (dotted for plugins: ``plugin_options.vae_tiling``) and
  ``options`` the capability's dataclass for it. ``plan()`` converts the group into that dataclass
  once and calls its ``validate(prefix)``; ``check``, ``enabled`` and ``apply`` receive the typed
  object, so no stage converts or re-validates its own config.
- ``after`` names the stages it must follow and ``before`` those it must precede, when both are
  listed: what it reads from the ``Assembly`` (``graph_hit``, ``compiled``) someone earlier sets.

Stages communicate through the ``Assembly`` they are given (``onediffx.assembly``), never through globals.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Optional, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..assembly import Assembly
from ..errors import ConfigError

O = TypeVar("O")


class Stage(Generic[O]):
    """Base class of registered stages; subclasses declare ``group``/``options``/``after`` and override what they need."""

    name: ClassVar[str] = ""
    group: ClassVar[Optional[str]] = None
    """Config key this stage reads (``None`` if it reads none); the error prefix of its options."""
    options: ClassVar[Optional[type]] = None
    """Dataclass that ``group`` converts into (``None``: the stage is given ``None``)."""
    after: ClassVar[tuple[str, ...]] = ()
    """Stages this one must follow when both are listed in ``stages``."""
    before: ClassVar[tuple[str, ...]] = ()
    """Stages this one must precede when both are listed (for plugins: built-in stages cannot name them)."""

    def check(self, options: O, cfg: DictConfig) -> None:
        """Checks that need more than the options' own ``validate`` (other groups, files, packages)."""

    def enabled(self, asm: Assembly, options: O) -> bool:
        """Whether ``apply`` has anything to do for this config."""
        return True

    def apply(self, asm: Assembly, options: O) -> None:
        """Change ``asm.pipe`` (in place or by replacing it)."""
        raise NotImplementedError


def read_options(stage: type[Stage] | Stage, cfg: DictConfig) -> Any:
    """The stage's group as its ``options`` dataclass, validated; ``ConfigError`` naming the key path.

    A typed group converts as it is; an untyped one (a plugin's ``plugin_options.<name>``) is merged
    into the dataclass first, so unknown keys and wrong types fail with their path. A class that
    is not one config node (the LoRA stack) converts itself with ``from_config``.
    """
    schema = stage.options
    if schema is None or stage.group is None:
        return None
    node = OmegaConf.select(cfg, stage.group)
    try:
        if hasattr(schema, "from_config"):
            typed = schema.from_config(node)
        elif isinstance(node, DictConfig) and issubclass(OmegaConf.get_type(node) or dict, schema):
            typed = OmegaConf.to_object(node)
        else:
            typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node or {}))
    except OmegaConfBaseException as err:
        key = f"{stage.group}.{err.key}" if getattr(err, "key", None) else stage.group
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    if hasattr(typed, "validate"):
        typed.validate(f"{stage.group}.")
    return typed


def check_order(stages: Sequence[type[Stage] | Stage]) -> None:
    """Refuse a ``stages`` list that puts a stage before one it must follow, in one line naming both."""
    position = {}
    for i, stage in enumerate(stages):
        position.setdefault(stage.name, i)
    pairs = [(first, stage.name) for stage in stages for first in stage.after]
    pairs += [(stage.name, later) for stage in stages for later in stage.before]
    for first, later in pairs:
        if first in position and later in position and position[first] > position[later]:
            raise ConfigError(f"stages: {later!r} must come after {first!r} (it uses what {first} leaves); "
                              f"list {first} before {later}, e.g. stages=[...,{first},...,{later},...]")


__all__ = ["Assembly", "Stage", "check_order", "read_options"]
