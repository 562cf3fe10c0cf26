"""The ``lora-fuse`` stage (placeholder until the LoRA engine lands)."""

from __future__ import annotations

from ..errors import NotAvailableError
from ..registry import register_stage
from .base import Assembly, Stage


@register_stage("lora-fuse")
class LoraFuseStage(Stage):
    group = "lora"

    def enabled(self, asm: Assembly) -> bool:
        return bool(asm.cfg.lora)

    def apply(self, asm: Assembly) -> None:
        raise NotAvailableError("lora-fuse: LoRA fusing is not available yet; run with lora=[]")
