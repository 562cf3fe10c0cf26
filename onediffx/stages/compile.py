"""The ``compile`` stage: ``compile_pipe`` with the ``compile`` group's options."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ..compile import compile_pipe
from ..compile.backends import resolve_backend
from ..config.schema import CompileConfig
from ..errors import ConfigError
from ..registry import get_backend, register_stage
from .base import Assembly, Stage

GRAPHS = ("aot", "dynamo")


@register_stage("compile")
class CompileStage(Stage):
    """Compile UNet / VAE decoder / ControlNet in place (graphs keep reading the live weights)."""

    group = "compile"

    def check(self, cfg: DictConfig) -> None:
        import onediffx.compile  # noqa: F401  (registers the built-in backends)

        if cfg.compile.backend != "auto":
            backend = get_backend(cfg.compile.backend)
            if hasattr(backend, "check"):  # optional engines say now, not after the model loads
                backend.check()
        if cfg.compile.graph not in GRAPHS:
            raise ConfigError(f"compile.graph: {cfg.compile.graph!r} is not allowed; expected one of {', '.join(GRAPHS)}")
        for name in cfg.compile.regions:
            if not str(name).isidentifier():
                raise ConfigError(f"compile.regions: {name!r} is not a class name; expected names such as BasicTransformerBlock")
        if cfg.compile.progressive:
            needs = [why for bad, why in ((cfg.compile.graph != "aot", "compile.graph=aot"),
                                          (cfg.compile.regional, "compile.regional=false"),
                                          (not cfg.cache.enabled, "cache.enabled=true"),
                                          (cfg.deepcache.enabled, "deepcache=off")) if bad]
            if needs:
                raise ConfigError(f"compile.progressive: needs {', '.join(needs)} (it serves regional graphs while "
                                  "saveable whole-component graphs compile into the cache)")
        if cfg.compile.vae_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ConfigError(f"compile.vae_dtype: {cfg.compile.vae_dtype!r} is not allowed; expected bfloat16, float16 or float32")

    def enabled(self, asm: Assembly) -> bool:
        return resolve_backend(asm.cfg.compile.backend, asm.device) != "none"

    def apply(self, asm: Assembly) -> None:
        options: CompileConfig = OmegaConf.to_object(asm.cfg.compile)
        backend = resolve_backend(options.backend, asm.device)
        compile_pipe(asm.pipe, backend, options, on_miss=asm.cfg.warmup.unprepared)
        state = asm.pipe._onediffx_compile
        asm.state["compiled"] = True
        asm.note(self.name, backend=backend, saveable=sorted(state.saveable), dynamo=state.dynamo)
