"""Step caches for diffusion transformers, through diffusers' own hooks (``stepcache`` group).

First-block cache, TaylorSeer and MagCache skip or extrapolate transformer blocks on steps whose
input barely changed. diffusers implements all three as hooks (``diffusers.hooks``); this package
only turns the ``stepcache`` config into diffusers' config objects and applies them through the
transformer's ``enable_cache``, so the hooks stay diffusers' own as diffusers moves.
"""

from .apply import disable, enable, step_cache_of
from .config import StepCacheConfig, StepCacheKind

__all__ = ["StepCacheConfig", "StepCacheKind", "disable", "enable", "step_cache_of"]
