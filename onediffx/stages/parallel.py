"""The ``parallel`` stage: join the other process and split guidance over both (``parallel=cfg``).

It comes after ``compile``, ``load-graph`` and ``stepcache``, so its hook is the denoiser's
outermost (the exchange stays outside every graph), and before ``warmup``, whose calls both
processes must make together. ``onediffx run`` starts the second process (``parallel.rank=1``) with
the same overrides; this stage is where the two meet.
"""

from __future__ import annotations

from datetime import timedelta

from ..parallel.config import ParallelConfig
from ..registry import register_stage
from .base import Assembly, Stage


@register_stage("parallel")
class ParallelStage(Stage[ParallelConfig]):
    """Meet the other rank (``torch.distributed``) and put ``CfgSplit`` on the denoiser."""

    group = "parallel"
    options = ParallelConfig
    after = ("compile", "load-graph", "stepcache")
    before = ("warmup",)

    def enabled(self, asm: Assembly, options: ParallelConfig) -> bool:
        return options.enabled

    def apply(self, asm: Assembly, options: ParallelConfig) -> None:
        import os

        import torch.distributed as dist

        from ..errors import ConfigError
        from ..parallel import split_guidance

        if not dist.is_initialized():
            backend = options.backend if options.backend != "auto" else ("nccl" if asm.device.type == "cuda" else "gloo")
            port = options.port or int(os.environ.get("MASTER_PORT", "0"))
            if not port:
                raise ConfigError("parallel.port: no rendezvous port; run through onediffx run parallel=cfg, which "
                                  "picks one and starts the second process")
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=options.rank,
                                    world_size=options.world_size, timeout=timedelta(seconds=options.timeout_s))
        split_guidance(asm.pipe)
        asm.note(self.name, kind="cfg", rank=dist.get_rank(), world_size=dist.get_world_size(),
                 backend=dist.get_backend())
