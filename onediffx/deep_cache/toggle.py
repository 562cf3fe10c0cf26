"""DeepCache on and off for a whole pipeline, as diffusers' ``CacheMixin`` has ``enable_cache``/``disable_cache``.

``enable(pipe, params)`` checks ``params`` against the pipeline's UNet, installs the hooks, gives the
pipeline its DeepCache variant (same class name, ``__call__`` also takes the cache arguments) and
keeps ``params`` in the pipeline's ``state.DEEP_CACHE`` slot: calls that pass no cache arguments use
them. ``disable(pipe)`` empties the slot and removes the hooks: the next call is diffusers' own.
The ``deepcache`` stage, the server and the benchmarks all switch DeepCache through these.
"""

from __future__ import annotations

from typing import Any, Optional

from ..state import DEEP_CACHE
from .config import DeepCacheParams
from .hook import DeepCache
from .params import disable_deep_cache, prepare
from .pipelines import DeepCacheMixin, deep_cache_class


def accept_cache_arguments(pipe: Any) -> Any:
    """Make ``pipe`` its DeepCache variant (its calls take ``cache_interval``, ...); return it."""
    if not isinstance(pipe, DeepCacheMixin):
        pipe.__class__ = deep_cache_class(type(pipe))
    return pipe


def enable(pipe: Any, params: DeepCacheParams, prefix: str = "") -> DeepCache:
    """DeepCache with ``params`` on every call of ``pipe`` that passes no cache arguments of its own.

    ``prefix`` names the config group in errors (``deepcache.``). Returns the UNet's DeepCache state.
    """
    state = prepare(pipe, params, prefix)
    accept_cache_arguments(pipe)
    DEEP_CACHE.set(pipe, params)
    return state


def disable(pipe: Any) -> Optional[DeepCacheParams]:
    """DeepCache off: the slot emptied and the UNet's hooks removed; returns the settings it had."""
    params = DEEP_CACHE.clear(pipe)
    disable_deep_cache(pipe)
    return params


def enabled(pipe: Any) -> Optional[DeepCacheParams]:
    """The settings ``enable`` gave ``pipe`` (``None``: its calls cache only when they ask to)."""
    return DEEP_CACHE.get(pipe)
