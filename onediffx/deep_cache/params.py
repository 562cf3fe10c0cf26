"""DeepCache settings of one pipeline call, and turning them on for exactly that call."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ..errors import ConfigError
from .hook import DeepCache, Schedule
from .layout import is_spatio_temporal, pipeline_unet, skip_index_from_branch, skip_index_from_layer_block
from .schedule import SCHEDULES


@dataclass(frozen=True)
class DeepCacheParams:
    """OneDiffX's call arguments: ``cache_layer_id``/``cache_block_id`` for 2-D UNets, ``cache_branch`` for SVD."""

    cache_interval: int = 3
    cache_layer_id: int = 0
    cache_block_id: int = 0
    cache_branch: int = 0
    schedule: str = "uniform"

    def validate(self, prefix: str = "") -> None:
        """Checks that need no model; ``prefix`` names the keys as the user wrote them."""
        if self.cache_interval < 1:
            raise ConfigError(f"{prefix}cache_interval={self.cache_interval} must be >= 1 (1 disables caching)")
        for key in ("cache_layer_id", "cache_block_id", "cache_branch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}{key}={getattr(self, key)} must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{prefix}schedule={self.schedule!r} is not one of: {', '.join(SCHEDULES)}")

    def skip_index(self, unet: Any, prefix: str = "") -> int:
        """The branch as a skip index of this UNet (see ``layout``); ``ConfigError`` with the valid range."""
        if is_spatio_temporal(unet):
            return skip_index_from_branch(unet, self.cache_branch, prefix)
        return skip_index_from_layer_block(unet, self.cache_layer_id, self.cache_block_id, prefix)


def prepare(pipe: Any, params: DeepCacheParams, prefix: str = "") -> DeepCache:
    """Validate ``params`` against the pipeline's UNet and install the hooks (disarmed)."""
    params.validate(prefix)
    unet = pipeline_unet(pipe)
    state = DeepCache.of(unet)
    state.configure(params.skip_index(unet, prefix))
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
    unet = pipeline_unet(pipe)
    state = unet.__dict__.get("_onediffx_deep_cache")
    if state is not None:
        state.detach()


def _num_steps(pipe: Any) -> Optional[int]:
    """Denoising steps of the running call (pipelines set ``_num_timesteps`` just before their loop)."""
    steps = getattr(pipe, "_num_timesteps", None)
    if steps:
        return int(steps)
    timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    return len(timesteps) if timesteps is not None else None
