"""The ``deepcache`` stage: DeepCache on any supported pipeline, from the ``deepcache`` config group.

It does what ``onediffx.deep_cache``'s pipeline classes do, for whatever pipeline was loaded (SD
1.5/2.1, SDXL incl. Turbo and LCM, ControlNet, SVD): the ids are checked against this model's UNet
now, at assembly, rather than failing inside the first generation; the hooks go on the UNet; and the
pipeline object becomes its DeepCache variant (same class name, ``__call__`` wrapped, nothing else),
whose calls use these settings unless they pass their own. Running before ``compile`` means the
compile stage's warm-up already traces both the full and the shallow pass.
"""

from __future__ import annotations

from ..deep_cache.config import DeepCacheConfig
from ..deep_cache.schedule import ScheduleKind
from ..registry import register_stage
from .base import Assembly, Stage

PREFIX = "deepcache."


@register_stage("deepcache")
class DeepCacheStage(Stage[DeepCacheConfig]):
    """Reuse deep UNet features across steps (DeepCache) on any supported pipeline, from ``deepcache``."""

    group = "deepcache"
    options = DeepCacheConfig

    def enabled(self, asm: Assembly, options: DeepCacheConfig) -> bool:
        return options.enabled

    def apply(self, asm: Assembly, options: DeepCacheConfig) -> None:
        from ..deep_cache import enable
        from ..deep_cache.layout import replay_plan

        params = options.params()
        state = enable(asm.pipe, params, PREFIX)
        asm.note(
            self.name, cache_interval=params.cache_interval, schedule=ScheduleKind(params.schedule).value,
            skip_index=state.skip_index,
            replayed=[name for name, _ in replay_plan(state.unet, state.skip_index)],
        )
