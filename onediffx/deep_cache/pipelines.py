"""diffusers pipelines whose call also takes DeepCache arguments, OneDiffX's API.

Each class is diffusers' own class plus ``DeepCacheMixin``, which only wraps ``__call__``: the cache
arguments are taken out, DeepCache is armed for the call, and diffusers' ``__call__`` runs
unchanged. Nothing of diffusers' pipeline code is copied, so these follow diffusers' releases; a call
without cache arguments is exactly diffusers' call.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import diffusers

from ..mixins import with_mixin
from ..state import DEEP_CACHE
from .params import DeepCacheParams, deep_cache


class DeepCacheMixin:
    """Adds ``cache_interval``, ``cache_layer_id``, ``cache_block_id`` (SVD: ``cache_branch``) to ``__call__``.

    ``cache_schedule`` (``uniform``/``nonuniform``) is an extension. The settings ``enable`` keeps in
    the pipeline's ``state.DEEP_CACHE`` slot (the ``deepcache`` stage's) apply to calls that pass no
    cache arguments.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each class a ``__call__`` whose signature is diffusers' plus the cache arguments.

        Code that inspects the call (to see whether a pipeline takes ``image`` or ``num_frames``)
        then sees the real parameters rather than ``*args, **kwargs``.
        """
        super().__init_subclass__(**kwargs)

        def __call__(self, *args: Any, **kw: Any) -> Any:
            return DeepCacheMixin.__call__(self, *args, **kw)

        __call__.__signature__ = _call_signature(cls)
        __call__.__doc__ = DeepCacheMixin.__doc__
        cls.__call__ = __call__

    def __call__(
        self,
        *args: Any,
        cache_interval: Optional[int] = None,
        cache_layer_id: Optional[int] = None,
        cache_block_id: Optional[int] = None,
        cache_branch: Optional[int] = None,
        cache_schedule: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        given = {
            "cache_interval": cache_interval, "cache_layer_id": cache_layer_id, "cache_block_id": cache_block_id,
            "cache_branch": cache_branch, "schedule": cache_schedule,
        }
        given = {k: v for k, v in given.items() if v is not None}
        base = DEEP_CACHE.get(self)
        if not given and base is None:
            return super().__call__(*args, **kwargs)
        params = DeepCacheParams(**{**(vars(base) if base is not None else {}), **given})
        with deep_cache(self, params):
            return super().__call__(*args, **kwargs)


CACHE_ARGUMENTS = ("cache_interval", "cache_layer_id", "cache_block_id", "cache_branch", "cache_schedule")


def _call_signature(cls: type) -> inspect.Signature:
    base = next(c for c in cls.__mro__ if not issubclass(c, DeepCacheMixin) and "__call__" in c.__dict__)
    params = list(inspect.signature(base.__call__).parameters.values())
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in CACHE_ARGUMENTS]
    return inspect.Signature(params + tail)


class StableDiffusionPipeline(DeepCacheMixin, diffusers.StableDiffusionPipeline):
    """``diffusers.StableDiffusionPipeline`` with DeepCache call arguments."""


class StableDiffusionXLPipeline(DeepCacheMixin, diffusers.StableDiffusionXLPipeline):
    """``diffusers.StableDiffusionXLPipeline`` with DeepCache call arguments (also SDXL Turbo and LCM)."""


class StableVideoDiffusionPipeline(DeepCacheMixin, diffusers.StableVideoDiffusionPipeline):
    """``diffusers.StableVideoDiffusionPipeline`` with ``cache_interval`` and ``cache_branch``."""


_NAMED = (StableDiffusionPipeline, StableDiffusionXLPipeline, StableVideoDiffusionPipeline)


def deep_cache_class(base: type) -> type:
    """The DeepCache variant of a diffusers pipeline class, with the same name.

    Keeping the name keeps ``save_pretrained``'s ``model_index.json`` loadable by plain diffusers.
    """
    for cls in _NAMED:
        if cls.__bases__[1] is base:
            return cls
    return with_mixin(DeepCacheMixin, base, "with DeepCache call arguments")
