"""``StepCacheConfig``: the ``stepcache`` config group and its one set of checks.

It imports nothing heavy (composing a config must not import torch); turning it into diffusers'
config objects happens in ``apply.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from ..errors import ConfigError


class StepCacheKind(str, Enum):
    """Which of diffusers' step caches (``stepcache.kind``)."""

    off = "off"
    fbc = "fbc"
    """First-block cache: when the first block's residual changed less than ``threshold``, reuse the rest's."""
    taylorseer = "taylorseer"
    """TaylorSeer: compute every ``cache_interval`` steps, extrapolate block outputs in between."""
    magcache = "magcache"
    """MagCache: skip blocks while the accumulated magnitude-ratio error stays under ``threshold``."""


@dataclass
class StepCacheConfig:
    """The ``stepcache`` group (``stepcache=off|fbc|taylorseer|magcache``); fields unused by a kind are ignored."""

    kind: StepCacheKind = StepCacheKind.off
    threshold: Optional[float] = None
    """fbc and magcache: the change below which blocks are skipped (``None``: diffusers' default, 0.05 / 0.06)."""
    cache_interval: int = 5
    """taylorseer: full computations this many steps apart."""
    disable_cache_before_step: int = 3
    """taylorseer: steps computed in full at the start."""
    max_order: int = 1
    """taylorseer: the Taylor expansion's order."""
    lite: bool = False
    """taylorseer: diffusers' lite mode (hooks on whole blocks and ``proj_out`` only; composes with regional graphs)."""
    max_skip_steps: int = 3
    """magcache: consecutive steps that may be skipped."""
    retention_ratio: float = 0.2
    """magcache: the fraction of first steps never skipped."""

    @property
    def enabled(self) -> bool:
        return StepCacheKind(self.kind) != StepCacheKind.off

    def validate(self, prefix: str = "stepcache.") -> None:
        """Ranges types cannot express; ``prefix`` names the keys as the user wrote them."""
        if self.threshold is not None and not 0 < self.threshold < 10:
            raise ConfigError(f"{prefix}threshold={self.threshold} must be above 0 and below 10")
        for key, low in (("cache_interval", 1), ("disable_cache_before_step", 0), ("max_order", 0),
                         ("max_skip_steps", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"{prefix}{key}={getattr(self, key)} must be >= {low}")
        if not 0 <= self.retention_ratio <= 1:
            raise ConfigError(f"{prefix}retention_ratio={self.retention_ratio} must be from 0 to 1")

    def check_compile(self, regional: bool, graph: str, prefix: str = "stepcache") -> None:
        """With compiling on: the cache's per-step decision must stay outside every compiled graph.

        Its hooks go on the transformer's blocks (TaylorSeer's on the attentions inside them, unless
        ``lite``). Only ahead-of-time regional graphs keep them outside: each block's graph sits under
        the cache's hook, which decides in Python whether to call it. A whole-transformer graph, or
        Dynamo tracing a hooked block, would trace the decision itself.
        """
        kind = StepCacheKind(self.kind).value
        if not regional or graph != "aot":
            raise ConfigError(f"{prefix}={kind}: composes with regional graphs only (compile=regional_aot); a "
                              "whole-transformer graph would contain the cache's per-step decision; or use compile=none")
        if StepCacheKind(self.kind) == StepCacheKind.taylorseer and not self.lite:
            raise ConfigError(f"{prefix}=taylorseer: its hooks sit on attentions inside the compiled blocks; set "
                              f"{prefix}.lite=true (hooks on whole blocks) or compile=none")
