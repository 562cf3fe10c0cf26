"""Turning DeepCache on for exactly one call, with settings from ``config``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

from ..hooks import DEEP_CACHE_DISPATCH, get_hook
from .config import DeepCacheParams
from .hook import DeepCache, Schedule
from .layout import is_spatio_temporal, pipeline_unet, skip_index_from_branch, skip_index_from_layer_block


def skip_index(params: DeepCacheParams, unet: Any, prefix: str = "") -> int:
    """The branch as a skip index of this UNet (see ``layout``); ``ConfigError`` with the valid range."""
    if is_spatio_temporal(unet):
        return skip_index_from_branch(unet, params.cache_branch, prefix)
    return skip_index_from_layer_block(unet, params.cache_layer_id, params.cache_block_id, prefix)


def prepare(pipe: Any, params: DeepCacheParams, prefix: str = "") -> DeepCache:
    """Validate ``params`` against the pipeline's UNet and install the hooks (disarmed)."""
    params.validate(prefix)
    unet = pipeline_unet(pipe)
    state = DeepCache.of(unet)
    state.configure(skip_index(params, unet, prefix))
    return state


@contextmanager
def deep_cache(pipe: Any, params: DeepCacheParams, prefix: str = "") -> Iterator[DeepCache]:
    """DeepCache on ``pipe`` for the calls inside the block, state reset on entry, disarmed on exit."""
    state = prepare(pipe, params, prefix)
    state.start(Schedule(params.cache_interval, params.schedule), lambda: _num_steps(pipe))
    try:
        yield state
    finally:
        state.stop()


def disable_deep_cache(pipe: Any) -> None:
    """Remove DeepCache's hooks from the pipeline's UNet (they are otherwise kept between calls)."""
    state = get_hook(pipeline_unet(pipe), DEEP_CACHE_DISPATCH)  # the DeepCache hooked on the UNet, if any
    if state is not None:
        state.detach()


def _num_steps(pipe: Any) -> Optional[int]:
    """Denoising steps of the running call (pipelines set ``_num_timesteps`` just before their loop)."""
    steps = getattr(pipe, "_num_timesteps", None)
    if steps:
        return int(steps)
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    return len(timesteps) if timesteps is not None else None
