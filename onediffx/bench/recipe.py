"""The strongest plain-PyTorch peer: diffusers' documented ``torch.compile`` recipe for SDXL.

Channels-last UNet and VAE, fused q/k/v projections, the UNet compiled whole
(``mode="reduce-overhead"``: Inductor's CUDA graphs, or ``max-autotune-no-cudagraphs``) and the VAE's
``decode`` compiled, with the Inductor flags the guide sets. The steady and quantize scenarios
quote every onediffx row against it (``speedup_vs_recipe``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from ..assembly import Assembly
from ..denoiser import denoiser_name
from ..generate import Settings, generate
from .measure import timed

RECIPE = "diffusers-docs torch.compile recipe"
RECIPE_INDUCTOR = {"conv_1x1_as_mm": True, "epilogue_fusion": False}
"""The Inductor flags diffusers' SDXL torch.compile guide sets (its coordinate-descent tuning is left
out: it multiplies compile time for a percent or two)."""


@contextmanager
def _inductor_config(values: dict[str, Any]) -> Iterator[None]:
    import torch._inductor.config as config

    old = {k: getattr(config, k) for k in values}
    for k, v in values.items():
        setattr(config, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(config, k, v)


@contextmanager
def recipe_compiled(pipe: Any, mode: str = "reduce-overhead") -> Iterator[Any]:
    """diffusers' documented recipe applied in place on ``pipe``: channels-last denoiser (UNet or
    transformer) and VAE, fused q/k/v, ``torch.compile(denoiser, mode=mode, fullgraph=True)`` and a
    compiled ``vae.decode``.

    Compiling is lazy (each new shape compiles at its first call), so the guide's Inductor flags stay
    set for as long as the recipe's pipeline is called, not only while ``torch.compile`` is wrapped.
    """
    name = denoiser_name(pipe)
    model = getattr(pipe, name)
    with _inductor_config(RECIPE_INDUCTOR):
        # SDXL's guide fuses through the pipeline (UNet and VAE); FLUX's fuses the transformer's own
        fuse = getattr(pipe, "fuse_qkv_projections", None) or getattr(model, "fuse_qkv_projections", None)
        if fuse is not None:
            fuse()
        model.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        setattr(pipe, name, torch.compile(model, mode=mode, fullgraph=True))
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)
        yield pipe


def recipe_row(asm: Assembly, settings: Settings, cfg: DictConfig, reference: np.ndarray, floor_s: float,
               row: Callable[..., dict[str, Any]], mode: str = "reduce-overhead") -> dict[str, Any]:
    """The recipe in place on ``asm.pipe``, measured by ``row`` (the steady scenario's row function)."""
    with recipe_compiled(asm.pipe, mode):
        first_s, _ = timed(lambda: generate(asm, settings), asm.device)
        out = row(f"{RECIPE} ({mode})", asm, settings, cfg, first_s, reference, floor_s)
    out["first_call_includes"] = "compile"
    return out
