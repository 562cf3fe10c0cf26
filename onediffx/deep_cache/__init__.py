"""DeepCache for diffusers UNet pipelines: reuse deep features across steps, compute the shallow branch.

``from onediffx.deep_cache import StableDiffusionXLPipeline`` then
``pipe(prompt, cache_interval=3, cache_layer_id=0, cache_block_id=0)`` is OneDiffX's API; the
``deepcache`` stage applies the same to any supported pipeline from config. How the ids map to the
``DeepCache`` package's ``cache_branch_id`` is in ``layout``; how it composes with ``torch.compile``
is in ``hook``.
"""

from .hook import DeepCache, Schedule
from .layout import helper_branch_id, pipeline_unet
from .params import DeepCacheParams, deep_cache, disable_deep_cache, prepare
from .pipelines import (
    DeepCacheMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    deep_cache_class,
)

__all__ = [
    "DeepCache",
    "DeepCacheMixin",
    "DeepCacheParams",
    "Schedule",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableVideoDiffusionPipeline",
    "deep_cache",
    "deep_cache_class",
    "disable_deep_cache",
    "helper_branch_id",
    "pipeline_unet",
    "prepare",
]
