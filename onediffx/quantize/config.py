"""``QuantizeConfig``: what ``quantize_pipe`` quantizes and how, for the Python API and the ``quantize`` group.

The ``quantize`` group's schema is this dataclass, so a preset file, a command-line override and a
``quantize_pipe(...)`` call are checked by the same types and the same ``validate``. This module
imports nothing heavy: composing a config must not import torch or torchao.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List

from ..errors import ConfigError


class QuantizeMode(str, Enum):
    """What the quantized layers compute with (``quantize=off|fp8|int8|fp8_weight_only|int8_weight_only``)."""

    off = "off"
    fp8 = "fp8"
    """fp8 (e4m3) activations and weights, row-wise scales, fp8 matmuls: GPUs of compute capability >= 8.9."""
    int8 = "int8"
    """int8 activations (dynamic, per token) and weights (per channel), int8 matmuls: Ampere GPUs and CPUs."""
    fp8_weight_only = "fp8_weight_only"
    """fp8 weights dequantized for bf16 matmuls: half the weight memory, no speed-up."""
    int8_weight_only = "int8_weight_only"
    """int8 weights, half-precision matmuls: half (a quarter on float32) the weight memory."""


class KeepOriginals(str, Enum):
    """Where the high-precision weights of quantized layers are kept (``quantize.keep_originals``).

    LoRA fusing computes from them (fuse, then re-quantize the touched layers); without them a LoRA
    cannot be fused into a quantized layer.
    """

    cpu = "cpu"
    device = "device"
    none = "none"


DEFAULT_EXCLUDE = ["*time_embedding*", "*time_embed.*", "*add_embedding*", "*conv_in", "*conv_out", "*norm*",
                   "*time_text_embed*", "transformer.x_embedder", "transformer.context_embedder", "transformer.proj_out"]
"""Layers known to be sensitive or too small to gain: the timestep and added-condition embeddings,
the first and last convolutions, and anything inside a norm (AdaLayerNorm's modulation linears);
in FLUX and SD3, the timestep/guidance/pooled-text embedding and the transformer's first and last
projections (the equivalents of a UNet's ``conv_in`` and ``conv_out``).
Patterns are ``fnmatch`` patterns on ``<component>.<module path>`` (``unet.time_embedding.linear_1``);
``quantize.exclude`` adds more."""


@dataclass
class CalibrateConfig:
    """``quantize.calibrate``: static activation scales from a few calls on the user's own model.

    ``prompts: 0`` (default) keeps the dynamic modes (a scale per activation row, computed per call).
    Above 0, fp8 and int8 quantize each layer's input with one scale fixed from the largest value
    it saw over ``prompts`` fixed prompts of ``steps`` steps, which Inductor folds into the kernel
    that produces the input. Ranges are saved beside the graph cache, keyed by the weights.
    """

    prompts: int = 0
    steps: int = 4
    min_sqnr_db: float = 0.0
    """Leave in high precision every layer whose SQNR on its calibration rows is below this (dB);
    0 quantizes every chosen layer. Each layer's SQNR is in metrics.json (``layer_sqnr_db``)."""

    min_speedup: float = 0.0
    """Leave in high precision every layer whose 8-bit form is not at least this many times faster
    than its 16-bit form on this card (e.g. 1.05), timed at the input shape it saw during calibration
    (``onediffx.quantize.gain``) and saved with the ranges per card; 0 quantizes every chosen layer.
    Each timed layer's figure is in metrics.json (``layer_speedup``)."""

    def validate(self, prefix: str) -> None:
        from .calibrate import PROMPTS

        if not 0 <= self.prompts <= len(PROMPTS):
            raise ConfigError(f"{prefix}prompts={self.prompts} must be between 0 (no calibration) and {len(PROMPTS)}")
        if self.steps < 1:
            raise ConfigError(f"{prefix}steps={self.steps} must be >= 1")
        if not 0 <= self.min_speedup < 10:
            raise ConfigError(f"{prefix}min_speedup={self.min_speedup} must be from 0 (keep all) to below 10")
        if not 0 <= self.min_sqnr_db < 200:
            raise ConfigError(f"{prefix}min_sqnr_db={self.min_sqnr_db} must be from 0 (keep all) to below 200 dB")

    @property
    def enabled(self) -> bool:
        return self.prompts > 0


@dataclass
class QuantizeConfig:
    """The ``quantize`` config group and ``quantize_pipe``'s options."""

    mode: QuantizeMode = QuantizeMode.off
    components: List[str] = field(default_factory=lambda: ["denoiser"])
    """Pipeline attributes to quantize: ``denoiser`` (default: the UNet, or FLUX's and SD3's transformer),
    ``unet``, ``transformer``, ``controlnet``, ``vae.decoder``."""
    exclude: List[str] = field(default_factory=list)
    """More ``fnmatch`` patterns of layers to leave in high precision, added to ``DEFAULT_EXCLUDE``
    (e.g. ``["unet.down_blocks.0.*", "*.attn2.to_out.0"]``)."""
    default_exclude: bool = True
    """Apply ``DEFAULT_EXCLUDE`` (time embedding, first/last convolutions, norms)."""
    min_features: int = 16
    """Leave layers with fewer input or output features than this in high precision (their matmuls
    are too small for quantization to pay for its own scaling)."""
    cross_attention_kv: bool = True
    """Quantize, in the dynamic modes (fp8, int8), the key/value projections of cross-attentions
    (``attn2.to_k``/``to_v``/``to_kv``, IP-Adapter's ``to_k_ip``/``to_v_ip``). They read the text
    encoder's 77 tokens, so quantizing them gains no speed, but they hold 0.6 GiB of SDXL's weights.
    An empty negative prompt's all-zero states (SDXL) reach them as all-zero activation rows, which
    both modes keep at zero (fp8's ``FP8_ACTIVATION_LB``, int8's eps-clamped scales). ``false``
    leaves them in high precision. Weight-only modes always quantize them."""
    conv_1x1: bool = False
    """Quantize 1x1 convolutions as the matrix multiplies they are (the module becomes an
    ``nn.Linear`` over the channel dimension; its state dict then holds a 2-D weight)."""
    convs: bool = False
    """Also quantize the 3x3 (spatial) convolutions, with calibrated input scales and per-channel
    weight scales, through onediffx's 8-bit convolution op (cuDNN's fp8/int8 convolution on CUDA;
    a float32 reference elsewhere). Needs ``calibrate.prompts > 0``. ``*conv_in``/``*conv_out`` stay
    excluded by default; ``quantize.exclude`` and ``calibrate.min_sqnr_db`` apply as to linear layers."""
    attention: bool = False
    """Self-attentions (``attn1``) in fp8 through onediffx's ``sdpa_8bit`` op: cuDNN's fused fp8 attention
    on Hopper, per-call per-tensor scales for Q, K and V (no calibration), whatever ``mode`` the
    linear layers take; cross-attentions stay 16-bit."""
    fuse_qkv: bool = True
    """Fuse each attention's q/k/v projections (diffusers' ``fuse_qkv_projections``) before quantizing:
    one quantized matmul instead of three, and what ``compile.fuse_qkv`` would do later, which it
    cannot do to quantized weights."""
    keep_originals: KeepOriginals = KeepOriginals.cpu
    """Keep high-precision copies of quantized weights (``cpu``, ``device``, ``none``) for LoRA fusing."""
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    quality: bool = True
    """The ``quantize`` stage generates one image before and one after quantizing (same seed, eager)
    and reports PSNR/SSIM and one UNet output's relative error in metrics.json."""

    def validate(self, prefix: str = "quantize.") -> None:
        """Checks types cannot express; ``prefix`` names the keys as the user wrote them."""
        if self.min_features < 1:
            raise ConfigError(f"{prefix}min_features={self.min_features} must be >= 1")
        allowed = ("denoiser", "unet", "transformer", "controlnet", "vae.decoder", "vae")
        for name in self.components:
            if name not in allowed:
                raise ConfigError(f"{prefix}components: {name!r} is not one of {', '.join(allowed)}")
        self.calibrate.validate(f"{prefix}calibrate.")
        if self.calibrate.enabled and QuantizeMode(self.mode) not in (QuantizeMode.fp8, QuantizeMode.int8, QuantizeMode.off):
            raise ConfigError(f"{prefix}calibrate: {QuantizeMode(self.mode).value} quantizes no activations, so there is "
                              "nothing to calibrate; use quantize=fp8 or int8, or calibrate.prompts=0")
        if self.convs and self.enabled and not self.calibrate.enabled:
            raise ConfigError(f"{prefix}convs: 8-bit convolutions take a calibrated input scale; set "
                              f"{prefix}calibrate.prompts (e.g. quantize=fp8_static) or {prefix}convs=false")
        if not self.components and self.enabled:
            raise ConfigError(f"{prefix}components is empty; name at least one (e.g. [unet]) or use quantize=off")

    @property
    def enabled(self) -> bool:
        return QuantizeMode(self.mode) != QuantizeMode.off
