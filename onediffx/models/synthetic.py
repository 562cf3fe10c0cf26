"""Full-size pipelines with the real architecture and seeded random weights (``model.synthetic``).

Benchmarks need the real model sizes, but the machines that run them often cannot download
weights, and speed does not depend on what the weights are. ``arch/<name>.json`` holds the
published component configs of each model (UNet or transformer, VAE, text or image encoders
including FLUX's and SD3's T5-XXL, scheduler, pipeline class); ``build_synthetic`` instantiates them directly on the target device, so even SDXL's UNet is
initialised in seconds on a GPU rather than on the CPU. Classes come from the fixed allow-list
below, never from an import path in a file.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.configuration_utils import ConfigMixin
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..errors import ConfigError
from .pipelines import PIPELINES  # the same allow-list model.pipeline is checked against
from .tokenizer import offline_clip_tokenizer, offline_t5_tokenizer

ARCH_DIR = Path(__file__).with_name("arch")

# Allow-lists: the only classes an arch file may name.
COMPONENTS: dict[str, type] = {
    **{
        cls.__name__: cls
        for cls in (
            UNet2DConditionModel, UNetSpatioTemporalConditionModel, AutoencoderKL, AutoencoderKLTemporalDecoder,
            CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection, CLIPTokenizer,
            DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
            FluxTransformer2DModel, SD3Transformer2DModel, T5EncoderModel, FlowMatchEulerDiscreteScheduler,
        )
    },
    "CLIPImageProcessor": CLIPImageProcessor,  # named apart: without torchvision it is CLIPImageProcessorPil
    "T5TokenizerFast": T5TokenizerFast,  # named apart: transformers 5 calls the class T5Tokenizer
}


def synthetic_archs() -> list[str]:
    """Names accepted by ``model.arch`` (one per file in ``arch/``)."""
    return sorted(path.stem for path in ARCH_DIR.glob("*.json"))


@lru_cache(maxsize=None)
def _load_arch(arch: str) -> dict[str, Any]:
    if arch not in synthetic_archs():
        raise ConfigError(
            f"model.arch: unknown synthetic architecture {arch!r}; known: {', '.join(synthetic_archs())}"
        )
    return json.loads((ARCH_DIR / f"{arch}.json").read_text(encoding="utf-8"))


@contextmanager
def _creating(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """New tensors default to ``device`` and ``dtype``: modules are born where and as they will run."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _build(entry: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> Any:
    """Build one component from ``{"class": name, "config": {...}}`` (modules on ``device`` in ``dtype``)."""
    cls, config = COMPONENTS[entry["class"]], entry["config"]
    if issubclass(cls, torch.nn.Module):
        with _creating(device, dtype):
            module = cls(cls.config_class(**config)) if issubclass(cls, PreTrainedModel) else cls.from_config(config)
        # .to(device) catches stragglers: SVD's AlphaBlender makes its parameter with torch.Tensor([...]).
        return module.to(device).eval()
    if cls is CLIPTokenizer:
        return offline_clip_tokenizer(**config)
    if cls is T5TokenizerFast:
        return offline_t5_tokenizer(**config)
    return cls.from_config(config) if issubclass(cls, ConfigMixin) else cls(**config)


def build_synthetic(
    arch: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    *,
    controlnet: bool = False,
    seed: int = 0,
) -> DiffusionPipeline:
    """Build the full-size pipeline ``arch`` (see ``synthetic_archs()``) with weights seeded by ``seed``.

    ``controlnet=True`` adds a ControlNet initialised from the UNet (as diffusers' ``from_unet``
    does for training) and returns the matching ControlNet pipeline.
    """
    spec = _load_arch(arch)
    if controlnet and "controlnet_pipeline" not in spec:
        with_cn = [name for name in synthetic_archs() if "controlnet_pipeline" in _load_arch(name)]
        raise ConfigError(
            f"model.controlnet: synthetic architecture {arch!r} has no ControlNet pipeline; "
            f"use one of: {', '.join(with_cn)}"
        )
    torch.manual_seed(seed)
    components = {name: _build(entry, device, dtype) for name, entry in spec["components"].items()}
    pipeline = PIPELINES[spec["pipeline"]]
    if controlnet:
        with _creating(device, dtype):
            components["controlnet"] = ControlNetModel.from_unet(components["unet"]).to(device).eval()
        pipeline = PIPELINES[spec["controlnet_pipeline"]]
    return pipeline(**components, **spec.get("pipeline_kwargs", {}))
