"""DeepCache settings and their one set of checks.

``DeepCacheParams`` are OneDiffX's call arguments; ``DeepCacheConfig`` is the same fields plus
``enabled``, the schema of the ``deepcache`` config group. The fields and their checks live here
only: the stage, the pipelines' call arguments and the config all go through ``validate``. This
module imports nothing heavy, so composing a config does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .schedule import SCHEDULES, ScheduleKind


@dataclass
class DeepCacheParams:
    """OneDiffX's call arguments: ``cache_layer_id``/``cache_block_id`` for 2-D UNets, ``cache_branch`` for SVD."""

    cache_interval: int = 3
    cache_layer_id: int = 0
    cache_block_id: int = 0
    cache_branch: int = 0
    """SVD only: which skip branch keeps being recomputed."""
    schedule: ScheduleKind = ScheduleKind.uniform
    """``uniform`` (every ``cache_interval`` steps) or ``nonuniform`` (the paper's denser start)."""

    def validate(self, prefix: str = "") -> None:
        """Checks that need no model; ``prefix`` names the keys as the user wrote them."""
        if self.cache_interval < 1:
            raise ConfigError(f"{prefix}cache_interval={self.cache_interval} must be >= 1 (1 disables caching)")
        for key in ("cache_layer_id", "cache_block_id", "cache_branch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}{key}={getattr(self, key)} must be >= 0")
        if self.schedule not in SCHEDULES:  # a str from a Python caller; configs are checked by Hydra
            raise ConfigError(f"{prefix}schedule={str(self.schedule)!r} is not one of: {', '.join(SCHEDULES)}")


@dataclass
class DeepCacheConfig(DeepCacheParams):
    """The ``deepcache`` config group (``deepcache=off|i2|i3|i5``): the call arguments, and whether on."""

    enabled: bool = False

    def validate(self, prefix: str = "") -> None:
        """The call arguments' checks, when on: a disabled group's values are never used."""
        if self.enabled:
            self.params().validate(prefix)

    def params(self) -> DeepCacheParams:
        """The call arguments this config stands for."""
        return DeepCacheParams(**{k: v for k, v in vars(self).items() if k != "enabled"})
