"""Progressive start: the first images from regional graphs, then the whole-component graphs.

Whole-component graphs are the fastest per image, and the slowest to compile: 116 s to the first
SDXL image on an H100, against 41 s for regional graphs that make each image about 6% slower.
With ``compile.progressive``, a start that misses the graph cache serves from regional graphs at
once while a background process compiles the whole-component graphs into the cache; the first
call after they land switches to them (a cache load and one CUDA-graph capture, no compiling).
Every later start hits the cache and runs the whole-component graphs from its first image.

The background process is ``python -m onediffx.commands.background_compile`` on this run's resolved config
(LoRAs left out: compiled graphs read the weights, whatever they are). It writes only its own cache
entries, atomically and under the cache's lock, so the two processes never see each other's
half-written files.

The ``load-graph`` stage calls ``start`` on a miss; ``start`` hangs ``switch_when_ready`` and
``finish`` on the assembly's before-call and on-close hooks, so commands need not know about it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ..assembly import Assembly
from ..compile import compile_pipe, compile_state, load_pipe
from ..compile.pipe import pipeline_modules
from ..compile.config import CompileConfig
from ..config.schema import DEFAULT_STAGES

log = logging.getLogger("onediffx.compile")

INTERIM_REGIONS = ["BasicTransformerBlock", "ResnetBlock2D"]
"""Blocks compiled one by one while the whole-component graphs compile (``compile.regions`` wins)."""

BACKGROUND_STAGES = [name for name in DEFAULT_STAGES if name not in ("lora-fuse", "deepcache")]
"""The default order without LoRAs and DeepCache. Quantization is part of what the graphs were
traced over (and of their cache key): it stays."""


def interim_regions(pipe: Any, options: CompileConfig) -> list[str]:
    """``compile.regions`` as given, or those of ``INTERIM_REGIONS`` the pipeline's components contain."""
    if options.regions:
        return list(options.regions)
    present = {type(m).__name__ for component in pipeline_modules(pipe) for m in component.modules()}
    return [name for name in INTERIM_REGIONS if name in present]


def interim_options(options: CompileConfig, regions: list[str]) -> CompileConfig:
    """The regional options served while waiting: same engine and layout, blocks compiled alone."""
    return replace(options, regional=True, regions=list(regions), progressive=False)


def background_config(cfg: DictConfig) -> DictConfig:
    """The config the background process assembles: the whole-component graphs, nothing else."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.compile.progressive = False
    out.stages = list(BACKGROUND_STAGES)
    out.lora = {}
    if "quantize" in out:
        out.quantize.quality = False  # measured by the serving process already
    out.startup_report = False
    return out


class Progressive:
    """The background compile of one pipeline and the switch to its graphs."""

    def __init__(self, cfg: DictConfig, backend: str, full: CompileConfig, on_miss: str) -> None:
        self.backend, self.full, self.on_miss = backend, full, on_miss
        self.cache_dir = str(cfg.cache.dir)
        self.cache_access = dict(trusted=bool(cfg.cache.trusted), key_file=str(cfg.cache.key_file))
        Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
        fd, self.config_path = tempfile.mkstemp(prefix="progressive-", suffix=".yaml", dir=self.cache_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(background_config(cfg)))
        self.log_path = self.config_path[: -len(".yaml")] + ".log"
        self.started = time.perf_counter()
        self.finished: Optional[float] = None
        with open(self.log_path, "w", encoding="utf-8") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "onediffx.commands.background_compile", self.config_path],
                                         stdout=out, stderr=subprocess.STDOUT)
        log.warning("compile.progressive: serving from regional graphs; whole-component graphs compile in "
                    "process %d (log: %s)", self.proc.pid, self.log_path)

    def ready(self) -> bool:
        return self.proc.poll() is not None

    def wait(self) -> int:
        code = self.proc.wait()
        if self.finished is None:
            self.finished = time.perf_counter()
            Path(self.config_path).unlink(missing_ok=True)
            if code == 0:  # a failed compile's log stays, for the warning that names it
                Path(self.log_path).unlink(missing_ok=True)
        return code

    def facts(self) -> dict[str, Any]:
        log_kept = Path(self.log_path).exists() and self.finished is not None
        return {"background_pid": self.proc.pid, "background_log": self.log_path if log_kept else None,
                "background_s": None if self.finished is None else round(self.finished - self.started, 2)}

    def switch(self, pipe: Any) -> dict[str, Any]:
        """Swap the regional graphs for the saved whole-component ones; keep serving regional on failure."""
        code = self.wait()
        if code != 0:
            last = Path(self.log_path).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            log.warning("compile.progressive: the background compile failed (exit %d: %s); staying on regional "
                        "graphs", code, last[0] if last else "no output")
            return {**self.facts(), "switched": False, "reason": f"background exit {code}"}
        start = time.perf_counter()
        compile_pipe(pipe, self.backend, self.full, on_miss=self.on_miss)
        found = load_pipe(pipe, self.cache_dir, **self.cache_access)
        missed = sorted(k for k, v in found.items() if not v["hit"])
        if missed:  # those components compile at their next call, like any cache miss
            log.warning("compile.progressive: no saved graphs for %s; they compile at the next call", ", ".join(missed))
        return {**self.facts(), "switched": True, "switch_s": round(time.perf_counter() - start, 2), "missed": missed}


def start(asm: Assembly) -> dict[str, Any]:
    """After a cache miss: start the background compile, then recompile the pipeline regionally.

    Returns ``load_pipe``'s answer for the regional graphs (an earlier progressive start saved them),
    or ``{}`` when the pipeline has no block to compile alone and compiles whole graphs as usual.
    """
    state = compile_state(asm.pipe)
    regions = interim_regions(asm.pipe, state.options)
    if not regions:  # nothing to compile block by block: this start compiles whole graphs itself
        log.warning("compile.progressive: no %s blocks in this pipeline; compiling whole graphs now",
                    " or ".join(INTERIM_REGIONS))
        return {}
    on_miss = asm.cfg.warmup.unprepared
    asm.progressive = Progressive(asm.cfg, state.backend, state.options, on_miss)
    asm.add_before_call(switch_when_ready)
    asm.add_on_close(finish)
    compile_pipe(asm.pipe, state.backend, interim_options(state.options, regions), on_miss=on_miss)
    return load_pipe(asm.pipe, asm.cfg.cache.dir, trusted=bool(asm.cfg.cache.trusted), key_file=str(asm.cfg.cache.key_file))


def switch_when_ready(asm: Assembly) -> bool:
    """Before a call: switch to the whole-component graphs if they have landed; True if it switched."""
    progressive = asm.progressive
    if progressive is None or not progressive.ready():
        return False
    asm.progressive = None
    asm.note("progressive", **progressive.switch(asm.pipe))
    return True


def finish(asm: Assembly) -> None:
    """When the command is done: wait for the background compile, so the cache is complete and no process is left."""
    progressive = asm.progressive
    if progressive is None:
        return
    if not progressive.ready():
        log.warning("compile.progressive: waiting for the whole-component graphs to be saved")
    code = progressive.wait()
    asm.progressive = None
    asm.note("progressive", **progressive.facts(), switched=False, background_exit=code)
