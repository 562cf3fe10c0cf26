"""Turn a ``StepCacheConfig`` into diffusers' cache config and enable it on the pipeline's transformer."""

from __future__ import annotations

from typing import Any, Optional

from ..denoiser import denoiser, denoiser_name
from ..errors import ConfigError
from ..state import STEP_CACHE
from .config import StepCacheConfig, StepCacheKind


def diffusers_config(config: StepCacheConfig, transformer: Any, steps: int, prefix: str = "stepcache") -> Any:
    """diffusers' config object for ``config`` (``steps``: the calls' denoising steps, which MagCache needs)."""
    import torch
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    kind = StepCacheKind(config.kind)
    given = {} if config.threshold is None else {"threshold": config.threshold}
    if kind == StepCacheKind.fbc:
        return FirstBlockCacheConfig(**given)
    if kind == StepCacheKind.taylorseer:
        return TaylorSeerCacheConfig(cache_interval=config.cache_interval, max_order=config.max_order,
                                     disable_cache_before_step=config.disable_cache_before_step,
                                     taylor_factors_dtype=torch.float32, use_lite_mode=config.lite)
    ratios = _mag_ratios(transformer, prefix)
    return MagCacheConfig(num_inference_steps=steps, mag_ratios=ratios, max_skip_steps=config.max_skip_steps,
                          retention_ratio=config.retention_ratio, **given)


def _mag_ratios(transformer: Any, prefix: str) -> Any:
    """MagCache's per-step magnitude ratios: diffusers publishes FLUX's; other models must be calibrated."""
    from diffusers.hooks import mag_cache

    ratios = {"FluxTransformer2DModel": getattr(mag_cache, "FLUX_MAG_RATIOS", None)}.get(type(transformer).__name__)
    if ratios is None:
        raise ConfigError(f"{prefix}=magcache: diffusers publishes no magnitude ratios for {type(transformer).__name__}; "
                          "use stepcache=fbc or taylorseer")
    return ratios


def cacheable_transformer(pipe: Any, kind: str, prefix: str = "stepcache") -> Any:
    """The pipeline's transformer, or one line saying why diffusers' step caches cannot go on it."""
    name = denoiser_name(pipe)
    if name != "transformer":
        what = type(denoiser(pipe)).__name__ if name else "no denoiser"
        raise ConfigError(f"{prefix}={kind}: step caches work on transformers (FLUX); {type(pipe).__name__} has "
                          f"{what}: use deepcache=i3 for UNets, with stepcache=off")
    transformer = pipe.transformer
    if not hasattr(transformer, "enable_cache"):
        raise ConfigError(f"{prefix}={kind}: {type(transformer).__name__} has no diffusers cache support (CacheMixin: "
                          f"its pipeline opens no cache context around its calls); run with stepcache=off")
    return transformer


def enable(pipe: Any, config: StepCacheConfig, steps: int, prefix: str = "stepcache") -> Optional[Any]:
    """Enable the step cache ``config`` names on ``pipe.transformer``; return diffusers' config (``None``: off).

    Call it after ``compile_pipe`` (its hooks must wrap the compiled blocks, not be traced into them).
    """
    if not config.enabled:
        return None
    kind = StepCacheKind(config.kind).value
    transformer = cacheable_transformer(pipe, kind, prefix)
    made = diffusers_config(config, transformer, steps, prefix)
    if getattr(transformer, "_cache_config", None) is not None:
        transformer.disable_cache()
    transformer.enable_cache(made)
    STEP_CACHE.set(pipe, config)
    return made


def disable(pipe: Any) -> bool:
    """Remove the step cache's hooks from ``pipe.transformer``; whether one was on."""
    if STEP_CACHE.clear(pipe) is None:
        return False
    pipe.transformer.disable_cache()
    return True


def step_cache_of(pipe: Any) -> Optional[StepCacheConfig]:
    """The step cache enabled on ``pipe`` (``None``: none)."""
    return STEP_CACHE.get(pipe)
