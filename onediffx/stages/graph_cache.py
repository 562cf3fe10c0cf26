"""The ``load-graph`` and ``save-graph`` stages (placeholders until the graph cache lands)."""

from __future__ import annotations

from ..registry import register_stage
from .base import Assembly, Stage


@register_stage("load-graph")
class LoadGraphStage(Stage):
    group = "cache"

    def enabled(self, asm: Assembly) -> bool:
        return bool(asm.state.get("compiled")) and asm.cfg.cache.enabled

    def apply(self, asm: Assembly) -> None:
        asm.note(self.name, hit=False)


@register_stage("save-graph")
class SaveGraphStage(Stage):
    group = "cache"

    def enabled(self, asm: Assembly) -> bool:
        return bool(asm.state.get("compiled")) and asm.cfg.cache.enabled

    def apply(self, asm: Assembly) -> None:
        asm.note(self.name, saved=False)
