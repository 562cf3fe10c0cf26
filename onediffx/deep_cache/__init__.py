"""DeepCache for diffusers UNet pipelines: reuse deep features across steps, compute the shallow branch.

``from onediffx.deep_cache import StableDiffusionXLPipeline`` then
``pipe(prompt, cache_interval=3, cache_layer_id=0, cache_block_id=0)`` is OneDiffX's API; the
``deepcache`` stage applies the same to any supported pipeline from config. How the ids map to the
``DeepCache`` package's ``cache_branch_id`` is in ``layout``; ``enable``/``disable`` switch it for a
whole pipeline (``toggle``); how it composes with ``torch.compile``
is in ``hook``. Attributes load on first use, so the config schema can use ``DeepCacheConfig``
without importing diffusers.
"""

from ..lazy_exports import lazy_getattr

_EXPORTS = {
    "DeepCache": "hook", "Schedule": "hook",
    "DeepCacheConfig": "config", "DeepCacheParams": "config",
    "helper_branch_id": "layout", "pipeline_unet": "layout",
    "deep_cache": "params", "disable_deep_cache": "params", "prepare": "params",
    "enable": "toggle", "disable": "toggle", "enabled": "toggle", "accept_cache_arguments": "toggle",
    "DeepCacheMixin": "pipelines", "StableDiffusionPipeline": "pipelines", "StableDiffusionXLPipeline": "pipelines",
    "StableVideoDiffusionPipeline": "pipelines", "deep_cache_class": "pipelines",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
