"""Which kind of denoiser a LoRA file was made for, told from its key names alone.

A LoRA for another model family fails anyway (its layers are missing or of other shapes), but
only after conversion, and diffusers' FLUX converter fails on UNet keys with a list of every key
it could not map. Naming the family instead ("is for a UNet (SD 1.5/SDXL); this pipeline's
denoiser is a FluxTransformer2DModel") tells the user at once which file is wrong and why. The
markers are block names that only one family's trainers write; a file with none of them is left
to the shape check in ``fit``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Optional

import torch

from .errors import LoraMismatchError

FAMILY_NAMES = {"unet": "a UNet (SD 1.5/SDXL)", "flux": "FLUX.1", "sd3": "SD3/SD3.5"}

_MARKERS = (
    # UNet block names: diffusers' (down_blocks, mid_block) and the original SGM ones kohya writes.
    ("unet", re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|middle_block|output_blocks)[._]")),
    # FLUX: BFL names (kohya, XLabs) and the single-stream blocks diffusers names.
    ("flux", re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks|guidance_embedder|guidance_in)[._]")),
    # SD3: the original MMDiT names (kohya/ComfyUI).
    ("sd3", re.compile(r"(^|[._])(joint_blocks|context_block|x_block)[._]")),
)


def lora_family(keys: Iterable[str]) -> Optional[str]:
    """``unet``, ``flux`` or ``sd3`` when some key carries a marker of exactly one family, else ``None``."""
    found = set()
    for key in keys:
        for family, pattern in _MARKERS:
            if family not in found and pattern.search(key):
                found.add(family)
    return found.pop() if len(found) == 1 else None


def pipeline_family(components: Dict[str, torch.nn.Module]) -> Optional[str]:
    """The family of the pipeline's denoiser (``None``: a transformer this module has no markers for)."""
    if "unet" in components:
        return "unet"
    name = type(components.get("transformer")).__name__
    return "flux" if name.startswith("Flux") else "sd3" if name.startswith("SD3") else None


def denoiser_class(components: Dict[str, torch.nn.Module]) -> str:
    """The class name of the pipeline's denoiser, as messages show it."""
    module: Any = components.get("unet", components.get("transformer"))
    return type(module).__name__


def check_family(keys: Iterable[str], components: Dict[str, torch.nn.Module], label: str) -> None:
    """``LoraMismatchError`` when the LoRA's keys say it was made for another family of denoiser."""
    ours = pipeline_family(components)
    theirs = lora_family(keys)
    if theirs is None or ours == theirs:
        return
    raise LoraMismatchError(
        f"LoRA {label} is for {FAMILY_NAMES[theirs]}; this pipeline's denoiser is a {denoiser_class(components)}"
    )
