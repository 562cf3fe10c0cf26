"""The ``load-graph`` and ``save-graph`` stages: the compiled-graph cache around warm-up.

``load-graph`` runs right after ``compile``: a hit means the warm-up and the first image run
graphs read from disk, with no tracing or compiling. ``save-graph`` runs after warm-up and writes
only what was compiled in this process (a miss, or a shape the cache did not have yet).
"""

from __future__ import annotations

from ..registry import register_stage
from .base import Assembly, Stage


def _cache_in_use(asm: Assembly) -> bool:
    from ..compile import compile_state

    state = compile_state(asm.pipe)
    return bool(asm.cfg.cache.enabled and state is not None and state.backend != "none")


def _all_hit(found: dict) -> bool:
    return bool(found) and all(f["hit"] for f in found.values())


@register_stage("load-graph")
class LoadGraphStage(Stage):
    """Load compiled graphs saved by an earlier process (cache.dir), so nothing compiles."""

    group = "cache"

    def enabled(self, asm: Assembly) -> bool:
        return _cache_in_use(asm)

    def apply(self, asm: Assembly) -> None:
        from ..compile import load_pipe
        from . import progressive

        found = load_pipe(asm.pipe, asm.cfg.cache.dir)
        if not _all_hit(found) and asm.cfg.compile.progressive:
            asm.note(self.name, whole_component_hit=False)
            found = progressive.start(asm) or found  # {}: no blocks to serve from, compile whole now
        hit = _all_hit(found)
        asm.graph_hit = hit
        stale = any(v.get("reason") in ("stale", "corrupt") for v in found.values())
        asm.note(self.name, hit=hit, stale=stale, dir=str(asm.cfg.cache.dir),
                 components={k: {"hit": v["hit"], "graphs": v.get("graphs", 0), "reason": v.get("reason")}
                             for k, v in found.items()})


@register_stage("save-graph")
class SaveGraphStage(Stage):
    """Save what this process compiled into cache.dir (atomic, locked; nothing when all was loaded)."""

    group = "cache"

    def enabled(self, asm: Assembly) -> bool:
        return _cache_in_use(asm)

    def apply(self, asm: Assembly) -> None:
        from ..compile import compile_state, save_pipe

        state = compile_state(asm.pipe)
        compiled_here = sum(c.compiles for c in state.saveable.values())
        if asm.graph_hit and not compiled_here:
            asm.note(self.name, saved=False, reason="all graphs came from the cache")
            return
        written = save_pipe(asm.pipe, asm.cfg.cache.dir, overwrite=False)
        asm.note(self.name, saved=bool(written), compiled_here=compiled_here, written=written)
