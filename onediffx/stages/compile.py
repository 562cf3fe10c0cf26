"""The ``compile`` stage: ``compile_pipe`` with the ``compile`` group's options."""

from __future__ import annotations

from omegaconf import DictConfig

from ..compile.config import CompileConfig
from ..errors import ConfigError
from ..registry import get_backend, register_stage
from .base import Assembly, Stage


@register_stage("compile")
class CompileStage(Stage[CompileConfig]):
    """Compile UNet / VAE decoder / ControlNet in place (graphs keep reading the live weights)."""

    group = "compile"
    options = CompileConfig
    after = ("quantize",)
    """Graphs are traced over the quantized weights (``quantize_pipe``: call it before ``compile_pipe``)."""

    def check(self, options: CompileConfig, cfg: DictConfig) -> None:
        from ..compile import backends  # noqa: F401  (registers the built-in backends)

        if options.backend != "auto":
            backend = get_backend(options.backend)
            if hasattr(backend, "check"):  # optional engines say now, not after the model loads
                backend.check()
        if options.progressive:
            needs = [why for bad, why in ((options.graph != "aot", "compile.graph=aot"),
                                          (options.regional, "compile.regional=false"),
                                          (not cfg.cache.enabled, "cache.enabled=true"),
                                          (cfg.deepcache.enabled, "deepcache=off")) if bad]
            if needs:
                raise ConfigError(f"compile.progressive: needs {', '.join(needs)} (it serves regional graphs while "
                                  "saveable whole-component graphs compile into the cache)")

    def enabled(self, asm: Assembly, options: CompileConfig) -> bool:
        from ..compile.backends import resolve_backend

        return resolve_backend(options.backend, asm.device) != "none"

    def apply(self, asm: Assembly, options: CompileConfig) -> None:
        from ..compile import compile_pipe, compile_state
        from ..compile.backends import resolve_backend

        backend = resolve_backend(options.backend, asm.device)
        compile_pipe(asm.pipe, backend, options, on_miss=asm.cfg.warmup.unprepared)
        state = compile_state(asm.pipe)
        asm.compiled = sorted([*state.saveable, *state.dynamo])
        asm.note(self.name, backend=backend, saveable=sorted(state.saveable), dynamo=state.dynamo)
