"""The ``load-graph`` and ``save-graph`` stages: the compiled-graph cache around warm-up.

``load-graph`` runs right after ``compile``: a hit means the warm-up and the first image run
graphs read from disk, with no tracing or compiling. ``save-graph`` runs after warm-up and writes
only what was compiled in this process (a miss, or a shape the cache did not have yet); each call
that compiles saves too (``SaveAsCompiled``), so a start cut short keeps the shapes it finished.

A hit is checked after the first call (the warm-up's, or the first image's when warm-up is
skipped): if anything compiled all the same (a loaded graph whose guards failed, a kernel
rebuilt), the report says ``hit: false, reason: "compiled after load"`` and the graphs are saved
anew, so a cache can never report hits that compile at every start.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf

from ..config.schema import CacheConfig
from ..registry import register_stage
from .base import Assembly, Stage

log = logging.getLogger("onediffx.graph_cache")
COMPILED_AFTER_LOAD = "compiled after load"
KERNELS_REBUILT = "kernels rebuilt"


def _cache_in_use(asm: Assembly, options: CacheConfig) -> bool:
    from ..compile import compile_state

    state = compile_state(asm.pipe)
    return bool(options.enabled and state is not None and state.backend != "none")


def _access(asm: Assembly) -> dict[str, Any]:
    return dict(trusted=bool(asm.cfg.cache.trusted), key_file=str(asm.cfg.cache.key_file))


def _all_hit(found: dict) -> bool:
    return bool(found) and all(f["hit"] for f in found.values())


def _all_loaded(found: dict) -> bool:
    """Every component has graphs (a hit, or graphs loaded whose kernels had to be rebuilt)."""
    return bool(found) and all(f["hit"] or f.get("reason") == KERNELS_REBUILT for f in found.values())


def compile_events(asm: Assembly) -> int:
    """Graphs compiled in this process so far, by any path: ahead-of-time graphs, Inductor
    compiles behind Dynamo (its FX graph cache misses) and C++ kernels built."""
    from torch._dynamo.utils import counters

    from ..compile import compile_state
    from ..graph_cache import kernels

    state = compile_state(asm.pipe)
    if state is None:
        return 0
    saveable = sum(c.compiles for c in state.saveable.values())
    # Saved graphs build their kernels while loading (load_pipe reports that); only Dynamo's path
    # builds them at a call. Counted only there, so another process sharing Inductor's folder is no noise.
    built = len(kernels.present()) if state.dynamo else 0
    return saveable + int(counters["inductor"]["fxgraph_cache_miss"]) + built


class HitCheck:
    """Compares compile events after the first call with those right after a hit."""

    def __init__(self, asm: Assembly) -> None:
        self.baseline = compile_events(asm)
        self.calls = 0
        self.done = False

    def before_call(self, asm: Assembly) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call has run
            self.check(asm)

    def on_close(self, asm: Assembly) -> None:
        if self.calls:
            self.check(asm)

    def check(self, asm: Assembly) -> None:
        if self.done:
            return
        self.done = True
        compiled = compile_events(asm) - self.baseline
        if compiled <= 0 or asm.report.get("load-graph", {}).get("reason") == COMPILED_AFTER_LOAD:
            return
        log.warning("graph cache: every graph loaded from %s, yet the first call compiled %d more (a loaded "
                    "graph did not fit this process); reporting a miss and saving anew", asm.cfg.cache.dir, compiled)
        miss_after_load(asm, compiled)
        if asm.planned("save-graph"):
            save(asm)


def miss_after_load(asm: Assembly, compiled: int) -> None:
    asm.graph_hit = False
    asm.note("load-graph", hit=False, reason=COMPILED_AFTER_LOAD, compiled_after_load=compiled)


def save(asm: Assembly) -> None:
    """Write what compiled since the last save; the report keeps every entry written in this process."""
    from ..compile import compile_state, save_pipe

    state = compile_state(asm.pipe)
    compiled_here = sum(c.compiles for c in state.saveable.values())
    written = save_pipe(asm.pipe, asm.cfg.cache.dir, overwrite=False, **_access(asm))
    written = {**asm.report.get("save-graph", {}).get("written", {}), **written}
    asm.note("save-graph", saved=bool(written), compiled_here=compiled_here, written=written)


class SaveAsCompiled:
    """Saves after each call that compiled something, not only once the warm-up is over.

    An SDXL graph takes one to two minutes to compile: a start that warms four shapes and is cut
    short (a deploy's time limit, a preempted machine, a ten-minute job) used to lose all of them;
    now the next start loads the shapes finished and compiles only the rest. A shape compiled while
    serving is kept for the next start the same way.
    """

    def __init__(self, asm: Assembly) -> None:
        self.seen = self._compiled(asm)

    @staticmethod
    def _compiled(asm: Assembly) -> int:
        """Counters only: this runs after every call, and ``compile_events`` lists Inductor's folder."""
        from torch._dynamo.utils import counters

        from ..compile import compile_state

        state = compile_state(asm.pipe)
        saveable = sum(c.compiles for c in state.saveable.values()) if state else 0
        return saveable + int(counters["inductor"]["fxgraph_cache_miss"]) + int(counters["stats"]["unique_graphs"])

    def after_call(self, asm: Assembly) -> None:
        events = self._compiled(asm)
        if events > self.seen and not asm.cfg.compile.progressive:  # progressive saves from its own process
            save(asm)
        self.seen = events


@register_stage("load-graph")
class LoadGraphStage(Stage[CacheConfig]):
    """Load compiled graphs saved by an earlier process (cache.dir), so nothing compiles."""

    group = "cache"
    options = CacheConfig
    after = ("compile",)
    """It loads graphs into what ``compile`` set up (no compile state: nothing to load)."""

    def enabled(self, asm: Assembly, options: CacheConfig) -> bool:
        return _cache_in_use(asm, options)

    def apply(self, asm: Assembly, options: CacheConfig) -> None:
        from ..compile import load_pipe
        from . import progressive

        found = load_pipe(asm.pipe, options.dir, **_access(asm))
        if not _all_loaded(found) and asm.cfg.compile.progressive:
            asm.note(self.name, whole_component_hit=False)
            found = progressive.start(asm) or found  # {}: no blocks to serve from, compile whole now
        hit = _all_hit(found)
        asm.graph_hit = hit
        stale = any(v.get("reason") in ("stale", "corrupt") for v in found.values())
        reasons = sorted({v["reason"] for v in found.values() if not v["hit"] and v.get("reason")})
        asm.note(self.name, hit=hit, stale=stale, dir=str(options.dir),
                 **({} if hit else {"reason": ", ".join(reasons) or "absent"}),
                 components={k: {"hit": v["hit"], "graphs": v.get("graphs", 0), "reason": v.get("reason"),
                                 **{f: v[f] for f in ("kernels_restored", "kernels_built", "read_s", "load_s") if f in v}}
                             for k, v in found.items()})
        if asm.planned("save-graph"):
            asm.add_after_call(SaveAsCompiled(asm).after_call)
        if hit:
            check = HitCheck(asm)
            asm.add_before_call(check.before_call)
            asm.add_on_close(check.on_close)
            asm.hit_check = check


@register_stage("save-graph")
class SaveGraphStage(Stage[CacheConfig]):
    """Save what this process compiled into cache.dir (atomic, locked; nothing when all was loaded)."""

    group = "cache"
    options = CacheConfig
    after = ("compile", "load-graph", "warmup")
    """It saves what the warm-up compiled, and reads ``load-graph``'s hit and its check of the first call."""

    def enabled(self, asm: Assembly, options: CacheConfig) -> bool:
        # parallel=cfg: both processes compile the same graphs; the first one files them
        return _cache_in_use(asm, options) and not OmegaConf.select(asm.cfg, "parallel.rank", default=0)

    def apply(self, asm: Assembly, options: CacheConfig) -> None:
        from ..compile import compile_state

        state = compile_state(asm.pipe)
        compiled_here = sum(c.compiles for c in state.saveable.values())
        check = asm.hit_check
        if asm.graph_hit and check is not None and check.calls:  # the warm-up was the first call
            check.done = True
            compiled = compile_events(asm) - check.baseline
            if compiled > 0:
                log.warning("graph cache: every graph loaded from %s, yet the warm-up compiled %d more; reporting "
                            "a miss and saving anew", options.dir, compiled)
                miss_after_load(asm, compiled)
        if asm.graph_hit and not compiled_here:
            asm.note(self.name, saved=False, reason="all graphs came from the cache")
            return
        save(asm)
