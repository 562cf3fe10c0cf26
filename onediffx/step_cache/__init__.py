"""Step caches for diffusion transformers, through diffusers' own hooks (``stepcache`` group).

First-block cache, TaylorSeer and MagCache skip or extrapolate transformer blocks on steps whose
input barely changed. diffusers implements all three as hooks (``diffusers.hooks``); this package
only turns the ``stepcache`` config into diffusers' config objects and applies them through the
transformer's ``enable_cache``, so the hooks stay diffusers' own as diffusers moves. Attributes
load on first use, so the config schema can use ``StepCacheConfig`` without importing torch.
"""

from ..lazy_exports import lazy_getattr

_EXPORTS = {
    "StepCacheConfig": "config", "StepCacheKind": "config",
    "enable": "apply", "disable": "apply", "step_cache_of": "apply", "diffusers_config": "apply",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
