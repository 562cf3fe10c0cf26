"""The ``deepcache`` stage (placeholder until DeepCache lands)."""

from __future__ import annotations

from ..errors import NotAvailableError
from ..registry import register_stage
from .base import Assembly, Stage


@register_stage("deepcache")
class DeepCacheStage(Stage):
    group = "deepcache"

    def enabled(self, asm: Assembly) -> bool:
        return bool(asm.cfg.deepcache.enabled)

    def apply(self, asm: Assembly) -> None:
        raise NotAvailableError("deepcache: DeepCache is not available yet; run with deepcache=off")
