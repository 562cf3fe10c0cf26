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
    "flux_dev": ("FluxPipeline", "FlowMatchEulerDiscreteScheduler", {
        "transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
    }),
    "flux_schnell": ("FluxPipeline", "FlowMatchEulerDiscreteScheduler", {
        "transformer": 11_891_178_560, "vae": 83_819_683, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
    }),
    "sd35_large": ("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler", {
        "transformer": 8_056_627_520, "vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
        "text_encoder_3": 4_762_310_656,
    }),
    "sd35_medium": ("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler", {
        "transformer": 2_243_171_520, "vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
        "text_encoder_3": 4_762_310_656,
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
    dev, schnell, medium = (build_synthetic(arch, META) for arch in ("flux_dev", "flux_schnell", "sd35_medium"))
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert dev.scheduler.config.use_dynamic_shifting and schnell.scheduler.config.shift == 1.0
    assert dev.vae.config.latent_channels == 16 and dev.vae.config.shift_factor == 0.1159
    assert dev.tokenizer_2("a fox", padding="max_length", max_length=512).input_ids[-1] == 0  # T5's pad id
    assert list(medium.transformer.config.dual_attention_layers) == list(range(13)) and medium.vae.config.scaling_factor == 1.5305


@pytest.mark.parametrize("arch", sorted(CONTROLNET))
def test_controlnet(arch: str) -> None:
    pipe = build_synthetic(arch, META, controlnet=True)
    pipeline, count = CONTROLNET[arch]
    assert type(pipe).__name__ == pipeline
    assert n_params(pipe.controlnet) == count


def test_unknown_arch() -> None:
    with pytest.raises(ConfigError) as err:
        build_synthetic("sd3", META)
    assert str(err.value) == ("model.arch: unknown synthetic architecture 'sd3'; known: flux_dev, flux_schnell, "
                              "sd15, sd21, sd35_large, sd35_medium, sdxl, svd")


def test_controlnet_needs_a_controlnet_arch() -> None:
    with pytest.raises(ConfigError, match="model.controlnet: .*'svd'.*sd15, sdxl"):
        build_synthetic("svd", META, controlnet=True)
