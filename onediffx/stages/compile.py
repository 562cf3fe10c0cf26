"""The ``compile`` stage: ``compile_pipe`` with the ``compile`` group's options."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..compile.config import CompileConfig
from ..errors import ConfigError
from ..registry import get_backend, register_stage
from .base import Assembly, Stage


@register_stage("compile")
class CompileStage(Stage):
    """Compile UNet / VAE decoder / ControlNet in place (graphs keep reading the live weights)."""

    group = "compile"

    def check(self, cfg: DictConfig) -> None:
        from ..compile import backends  # noqa: F401  (registers the built-in backends)

        if cfg.compile.backend != "auto":
            backend = get_backend(cfg.compile.backend)
            if hasattr(backend, "check"):  # optional engines say now, not after the model loads
                backend.check()
        OmegaConf.to_object(cfg.compile).validate()
        if cfg.compile.progressive:
            needs = [why for bad, why in ((cfg.compile.graph != "aot", "compile.graph=aot"),
                                          (cfg.compile.regional, "compile.regional=false"),
                                          (not cfg.cache.enabled, "cache.enabled=true"),
                                          (cfg.deepcache.enabled, "deepcache=off")) if bad]
            if needs:
                raise ConfigError(f"compile.progressive: needs {', '.join(needs)} (it serves regional graphs while "
                                  "saveable whole-component graphs compile into the cache)")

    def enabled(self, asm: Assembly) -> bool:
        from ..compile.backends import resolve_backend

        return resolve_backend(asm.cfg.compile.backend, asm.device) != "none"

    def apply(self, asm: Assembly) -> None:
        from ..compile import compile_pipe, compile_state
        from ..compile.backends import resolve_backend

        options: CompileConfig = OmegaConf.to_object(asm.cfg.compile)
        backend = resolve_backend(options.backend, asm.device)
        compile_pipe(asm.pipe, backend, options, on_miss=asm.cfg.warmup.unprepared)
        state = compile_state(asm.pipe)
        asm.compiled = sorted([*state.saveable, *state.dynamo])
        asm.note(self.name, backend=backend, saveable=sorted(state.saveable), dynamo=state.dynamo)
