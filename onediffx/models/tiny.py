"""Small built-in pipelines with the real diffusers classes and seeded weights.

They keep every code path of the full models (cross-attention, SDXL's added time ids, SVD's
temporal layers, ControlNet residuals; FLUX's and SD3's joint attention, rotary or patch position
embeddings, T5 prompts and 16-channel latents) at a size that runs in a second on a CPU, so the default
run and the test-suite need no download. Each builder seeds its own generator: the same name
always gives the same weights, in any process.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    ControlNetModel,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from .tokenizer import offline_clip_tokenizer, offline_t5_tokenizer

SEED = 0
TEXT_DIM = 32


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=64,
    )


def _text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=TEXT_DIM, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=514, **extra,
    )


def _sd_unet(**extra) -> UNet2DConditionModel:
    kwargs = dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=32,
    )
    kwargs.update(extra)
    return UNet2DConditionModel(**kwargs)


def _sdxl_unet() -> UNet2DConditionModel:
    return _sd_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TEXT_DIM, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8,
    )


def tiny_sd() -> StableDiffusionPipeline:
    torch.manual_seed(SEED)
    unet, vae, text_encoder = _sd_unet(), _vae(), CLIPTextModel(_text_config())
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=offline_clip_tokenizer(), unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    torch.manual_seed(SEED)
    unet, vae = _sdxl_unet(), _vae()
    text_encoder = CLIPTextModel(_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_DIM))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=offline_clip_tokenizer(), tokenizer_2=offline_clip_tokenizer(pad_token="!"),
        unet=unet, scheduler=_scheduler(),
    )


def tiny_controlnet() -> StableDiffusionControlNetPipeline:
    base = tiny_sd()
    torch.manual_seed(SEED + 1)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    return StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)


def tiny_controlnet_xl() -> StableDiffusionXLControlNetPipeline:
    base = tiny_sdxl()
    torch.manual_seed(SEED + 1)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32))
    return StableDiffusionXLControlNetPipeline(**base.components, controlnet=controlnet)


def tiny_instantid() -> StableDiffusionXLControlNetPipeline:
    """Tiny SDXL + IdentityNet + a narrow face adapter (512-d face in, 16 tokens out), all seeded."""
    from ..instantid.hook import attach_face_adapter
    from ..instantid.weights import seed_zero_convolutions, synthetic_face_adapter

    pipe = tiny_controlnet_xl()
    seed_zero_convolutions(pipe.controlnet, seed=SEED + 3)
    adapter = synthetic_face_adapter(pipe.unet, seed=SEED + 2, hidden=64, heads=1, dim_head=64)
    return attach_face_adapter(pipe, adapter)


def tiny_svd() -> StableVideoDiffusionPipeline:
    torch.manual_seed(SEED)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=8, transformer_layers_per_block=1, num_frames=2,
        addition_time_embed_dim=32, projection_class_embeddings_input_dim=96,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        intermediate_size=37, patch_size=14,
    ))
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler,
        feature_extractor=feature_extractor,
    )


def _latent16_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """FLUX's and SD3's VAE layout: 16 latent channels, no quant convolutions, a shift factor."""
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def _t5(d_model: int) -> T5EncoderModel:
    """T5's encoder; in eval mode, as ``from_pretrained`` leaves it (its dropout would make prompts random)."""
    return T5EncoderModel(T5Config(
        vocab_size=256, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
    )).eval()


def tiny_flux() -> FluxPipeline:
    """FLUX.1-dev's layout: CLIP pooled + T5 prompts, double- and single-stream blocks, guidance embedding."""
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    vae = _latent16_vae(scaling_factor=0.3611, shift_factor=0.1159)
    text_encoder, text_encoder_2 = CLIPTextModel(_text_config()), _t5(TEXT_DIM)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=offline_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=offline_t5_tokenizer(), transformer=transformer,
    )


def tiny_sd3() -> StableDiffusion3Pipeline:
    """SD3.5's layout: two CLIP encoders and T5, joint blocks with q/k RMS norm, one dual-attention block."""
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=2 * TEXT_DIM, caption_projection_dim=TEXT_DIM, pooled_projection_dim=2 * TEXT_DIM,
        out_channels=16, pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = _latent16_vae(scaling_factor=1.5305, shift_factor=0.0609)
    text_encoder = CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_DIM))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_DIM))
    text_encoder_3 = _t5(2 * TEXT_DIM)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=offline_clip_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=offline_clip_tokenizer(pad_token="!"), text_encoder_3=text_encoder_3,
        tokenizer_3=offline_t5_tokenizer(),
    )


BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny": tiny_sd,
    "tiny_xl": tiny_sdxl,
    "tiny_controlnet": tiny_controlnet,
    "tiny_controlnet_xl": tiny_controlnet_xl,
    "tiny_instantid": tiny_instantid,
    "tiny_svd": tiny_svd,
    "tiny_flux": tiny_flux,
    "tiny_sd3": tiny_sd3,
}


def build_tiny(name: str) -> DiffusionPipeline:
    """Build the built-in pipeline called ``name`` (one of ``BUILDERS``)."""
    return BUILDERS[name]()
