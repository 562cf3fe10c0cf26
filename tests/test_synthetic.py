"""Synthetic full-size pipelines: the real architectures, checked by exact parameter counts.

Everything is built on the ``meta`` device, so the multi-billion-parameter models cost no memory
and build in well under a second. The expected counts are those of the published checkpoints
(SD1.5 UNet 859.5M, SDXL UNet 2.567B, ...), measured once and pinned here.
"""

from __future__ import annotations

import pytest
import torch

from onediffx.errors import ConfigError
from onediffx.models.synthetic import build_synthetic, synthetic_archs

META = torch.device("meta")

# arch -> (pipeline class, scheduler class, {component: exact parameter count})
EXPECTED = {
    "sd15": ("StableDiffusionPipeline", "PNDMScheduler", {
        "unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480,
    }),
    "sd21": ("StableDiffusionPipeline", "DDIMScheduler", {
        "unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840,
    }),
    "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", {
        "unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
    }),
    "svd": ("StableVideoDiffusionPipeline", "EulerDiscreteScheduler", {
        "unet": 1_524_623_082, "vae": 97_742_847, "image_encoder": 632_076_800,
    }),
}
CONTROLNET = {"sd15": ("StableDiffusionControlNetPipeline", 361_279_120),
              "sdxl": ("StableDiffusionXLControlNetPipeline", 1_251_014_160)}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_archs_listed() -> None:
    assert synthetic_archs() == sorted(EXPECTED)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_full_size_architecture(arch: str) -> None:
    pipe = build_synthetic(arch, META, torch.float16)
    pipeline, scheduler, counts = EXPECTED[arch]
    assert type(pipe).__name__ == pipeline
    assert type(pipe.scheduler).__name__ == scheduler
    assert {name: n_params(getattr(pipe, name)) for name in counts} == counts
    for name in counts:
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float16}
        assert {p.device.type for p in getattr(pipe, name).parameters()} == {"meta"}
    assert torch.get_default_dtype() == torch.float32  # the build restores the global default


def test_model_specific_settings() -> None:
    sdxl, sd21, svd = (build_synthetic(arch, META) for arch in ("sdxl", "sd21", "svd"))
    assert sdxl.vae.config.scaling_factor == 0.13025 and sdxl.vae.config.force_upcast
    assert sdxl.tokenizer_2.pad_token == "!" and sdxl.text_encoder_2.config.hidden_act == "gelu"
    assert sd21.scheduler.config.prediction_type == "v_prediction" and sd21.unet.config.upcast_attention
    assert svd.scheduler.config.use_karras_sigmas and svd.unet.config.num_frames == 25
    assert svd.feature_extractor.crop_size == {"height": 224, "width": 224}


@pytest.mark.parametrize("arch", sorted(CONTROLNET))
def test_controlnet(arch: str) -> None:
    pipe = build_synthetic(arch, META, controlnet=True)
    pipeline, count = CONTROLNET[arch]
    assert type(pipe).__name__ == pipeline
    assert n_params(pipe.controlnet) == count


def test_unknown_arch() -> None:
    with pytest.raises(ConfigError) as err:
        build_synthetic("sd3", META)
    assert str(err.value) == "model.arch: unknown synthetic architecture 'sd3'; known: sd15, sd21, sdxl, svd"


def test_controlnet_needs_a_controlnet_arch() -> None:
    with pytest.raises(ConfigError, match="model.controlnet: .*'svd'.*sd15, sdxl"):
        build_synthetic("svd", META, controlnet=True)
