"""The ``warmup`` stage: run the prepared shapes before anything is timed.

Compilation happens on the first call at each shape; doing those calls here means the first
measured image is a steady-state one, and ``warmup.shapes`` prepares every resolution a service
will see so switching among them later costs nothing.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from ..config.schema import WarmupConfig
from ..registry import register_stage
from .base import Assembly, Stage

if TYPE_CHECKING:
    from ..generate import Settings


def warmup_settings(asm: Assembly) -> list[Settings]:
    """One ``Settings`` per prepared shape (the run's own shape when none are listed)."""
    from ..generate import Settings

    cfg = asm.cfg
    base = Settings.from_config(cfg, steps=cfg.warmup.steps)
    if not cfg.warmup.shapes:
        return [base]
    return [replace(base, height=s.height, width=s.width, seeds=[cfg.seed + i for i in range(s.batch)])
            for s in cfg.warmup.shapes]


@register_stage("warmup")
class WarmupStage(Stage[WarmupConfig]):
    """Run every prepared shape once before timing, so compiling happens before the first measured image."""

    group = "warmup"
    options = WarmupConfig
    after = ("compile", "load-graph")
    """It reads what they set: ``asm.compiled``, and ``asm.graph_hit`` (skipped after a full hit)."""

    def enabled(self, asm: Assembly, options: WarmupConfig) -> bool:
        # Eager pipelines have nothing to warm unless shapes are asked for explicitly.
        compiled = asm.cfg.compile.backend != "none" or bool(asm.compiled)
        if compiled and asm.graph_hit and options.on_cache_hit == "skip":
            # Nothing left to compile: a warm-up call would only add its own time before the first
            # image (H100, SDXL restart: first image 4.8 s without it, 5.4 s with it).
            return False
        return options.runs > 0 and bool(compiled or options.shapes)

    def apply(self, asm: Assembly, options: WarmupConfig) -> None:
        from ..generate import generate

        shapes = warmup_settings(asm)
        seconds = []
        for _ in range(options.runs):
            for settings in shapes:
                start = time.perf_counter()
                generate(asm, settings)
                seconds.append(round(time.perf_counter() - start, 3))
        # per call: a shape whose graphs came from the cache pays its CUDA-graph capture here
        asm.note(self.name, shapes=[[s.height, s.width, len(s.seeds)] for s in shapes], runs=options.runs,
                 call_seconds=seconds)
