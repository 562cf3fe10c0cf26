"""The ``compile`` stage (placeholder until the compile engine lands)."""

from __future__ import annotations

from ..errors import NotAvailableError
from ..registry import register_stage
from .base import Assembly, Stage


@register_stage("compile")
class CompileStage(Stage):
    group = "compile"

    def enabled(self, asm: Assembly) -> bool:
        return asm.cfg.compile.backend != "none"

    def apply(self, asm: Assembly) -> None:
        raise NotAvailableError("compile: compilation is not available yet; run with compile=none")
