"""The ``stepcache`` stage: diffusers' step cache (first-block, TaylorSeer, MagCache) on the transformer.

It comes after ``compile`` and ``load-graph`` so that diffusers' hooks wrap the blocks' compiled
graphs: the cache decides in Python, at each step, whether to call them. Refused in one line on a
UNet (``deepcache`` is the UNet's step cache) and with whole-transformer graphs.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..registry import register_stage
from ..step_cache.config import StepCacheConfig, StepCacheKind
from .base import Assembly, Stage

PREFIX = "stepcache"


@register_stage("stepcache")
class StepCacheStage(Stage[StepCacheConfig]):
    """Skip or extrapolate transformer blocks on steps that change little, with diffusers' own hooks."""

    group = "stepcache"
    options = StepCacheConfig
    after = ("compile", "load-graph")
    """Its hooks must sit above the compiled block graphs, never be traced into them."""
    before = ("warmup",)

    def check(self, options: StepCacheConfig, cfg: DictConfig) -> None:
        if not options.enabled:
            return
        from ..compile.backends import resolve_backend
        from ..device import resolve_device

        if resolve_backend(cfg.compile.backend, resolve_device(cfg.device)) != "none":
            options.check_compile(bool(cfg.compile.regional), str(cfg.compile.graph.value if hasattr(cfg.compile.graph, "value")
                                                                  else cfg.compile.graph), PREFIX)

    def enabled(self, asm: Assembly, options: StepCacheConfig) -> bool:
        return options.enabled

    def apply(self, asm: Assembly, options: StepCacheConfig) -> None:
        from ..generate import Settings
        from ..step_cache import enable

        steps = Settings.from_config(asm.cfg).steps
        made = enable(asm.pipe, options, steps, PREFIX)
        asm.note(self.name, kind=StepCacheKind(options.kind).value, diffusers=type(made).__name__)
