"""Which component of a pipeline denoises: the UNet (SD, SDXL, SVD) or the transformer (FLUX, SD3).

Stages and capabilities that act on "the model" (quantization's quality check, step caches, LoRA's
compute device) ask here rather than each trying ``pipe.unet`` and then ``pipe.transformer``, so a
new family needs one line here, and a capability that only fits one kind can say which it got.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

DENOISERS = ("unet", "transformer")
"""Pipeline attributes that hold the denoiser, in the order they are looked for."""


def denoiser_name(pipe: Any) -> Optional[str]:
    """``"unet"`` or ``"transformer"``: the attribute holding ``pipe``'s denoiser (``None``: neither)."""
    for name in DENOISERS:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    return None


def denoiser(pipe: Any) -> Optional[nn.Module]:
    """``pipe``'s denoiser module (``None`` when it has neither a UNet nor a transformer)."""
    name = denoiser_name(pipe)
    return None if name is None else getattr(pipe, name)
