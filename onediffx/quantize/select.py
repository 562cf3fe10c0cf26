"""Which layers of a component are quantized, and why the others are not.

Quantization pays off in the large matmuls and costs precision where a layer is small or feeds
everything after it (the timestep embedding, the first and last convolutions, norms). The choice
is made here, by name and size, and reported layer by layer, so a user can see what was quantized
and extend ``quantize.exclude`` where a layer turns out to matter.

fp8 also leaves in high precision any layer with an all-zero weight row: torchao bounds activation
scales from below (``modes.FP8_ACTIVATION_LB``) but has no such option for weights, whose zero
rows would get scale 0 and quantize to NaN. Skipping is exact where nudging the zeros would change
the layer, and such rows come from zero-initialised layers (an untrained ControlNet's outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterator, Optional

import torch
from torch import nn

from .config import DEFAULT_EXCLUDE, QuantizeConfig, QuantizeMode
from .modes import FP8_ALIGN


class PointwiseConv(nn.Linear):
    """A 1x1 convolution computed as the matrix multiply it is, over the channel dimension.

    An ``nn.Linear``, so torchao quantizes it like any linear layer and the LoRA engine fuses into it;
    its forward takes and returns NCHW tensors like the convolution it replaces. On channels-last
    inputs the permutes are free (the data already lies channel-innermost).
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "PointwiseConv":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = conv.in_channels, conv.out_channels
        layer.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, conv.in_channels),
                                    requires_grad=False)
        layer.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C', H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def is_pointwise_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1)


@dataclass
class Selection:
    """The layers to quantize (qualified names) and, for the rest, why not (name -> reason)."""

    chosen: list[str] = field(default_factory=list)
    """Linear layers (and 1x1 convolutions as linears): torchao quantizes them."""
    skipped: dict[str, str] = field(default_factory=dict)
    convs: list[str] = field(default_factory=list)
    """3x3 convolutions (``quantize.convs``): they become ``conv8.Conv8``."""

    def drop(self, names: set[str], reason: str) -> None:
        """Leave ``names`` in high precision, saying why."""
        for name in names & set(self.chosen + self.convs):
            self.skipped[name] = reason
        self.chosen = [n for n in self.chosen if n not in names]
        self.convs = [n for n in self.convs if n not in names]


def _unused_projections(component: nn.Module) -> set[int]:
    """``to_q``/``to_k``/``to_v`` of attentions whose fused copy (``fuse_qkv_projections``) is what runs."""
    unused: set[int] = set()
    for module in component.modules():
        if getattr(module, "fused_projections", False):
            names = ("to_k", "to_v") if getattr(module, "is_cross_attention", False) else ("to_q", "to_k", "to_v")
            unused |= {id(getattr(module, n)) for n in names if getattr(module, n, None) is not None}
    return unused


CROSS_KV = ("to_k", "to_v", "to_kv")
"""A cross-attention's projections of the encoder states (``to_kv``: their ``fuse_qkv_projections`` copy)."""
IP_KV = ("to_k_ip.", "to_v_ip.")
"""IP-Adapter processors' projections of the image embeddings (``processor.to_k_ip.0``)."""


def _cross_kv(component: nn.Module) -> set[int]:
    """The linear layers that project a cross-attention's encoder states into keys and values.

    They run on the encoder's few tokens (77 for CLIP), so dynamic quantization saves no time in
    them, only memory; and they are where the all-zero rows of an empty negative prompt (SDXL's
    ``force_zeros_for_empty_prompt``) enter a dynamically quantized layer.
    """
    found: set[int] = set()
    for module in component.modules():
        if not getattr(module, "is_cross_attention", False):
            continue
        found |= {id(m) for n in CROSS_KV if isinstance(m := getattr(module, n, None), nn.Module)}
        processor = getattr(module, "processor", None)
        if isinstance(processor, nn.Module):
            found |= {id(m) for n, m in processor.named_modules() if n.startswith(IP_KV)}
    return found


def zero_rows(weight: torch.Tensor) -> int:
    """How many output rows of ``weight`` are all zero (zero-initialised layers: ControlNet's outputs)."""
    return int((weight.detach().reshape(weight.shape[0], -1) == 0).all(dim=1).sum())


def excluded_by(name: str, patterns: list[str]) -> Optional[str]:
    return next((p for p in patterns if fnmatchcase(name, p)), None)


def candidates(component: nn.Module, prefix: str, config: QuantizeConfig) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of the component's linear layers, and its 1x1 convolutions when asked."""
    for path, module in component.named_modules():
        if isinstance(module, nn.Linear) or (config.conv_1x1 and is_pointwise_conv(module)):
            yield f"{prefix}.{path}" if path else prefix, module


def select(component: nn.Module, prefix: str, config: QuantizeConfig) -> Selection:
    """Choose the layers of ``component`` (named ``prefix`` in the pipeline) to quantize."""
    patterns = (list(DEFAULT_EXCLUDE) if config.default_exclude else []) + list(config.exclude)
    unused = _unused_projections(component)
    mode = QuantizeMode(config.mode)
    fp8 = mode in (QuantizeMode.fp8, QuantizeMode.fp8_weight_only)
    dynamic = mode in (QuantizeMode.fp8, QuantizeMode.int8)
    cross_kv = _cross_kv(component) if dynamic and not config.cross_attention_kv else set()
    out = Selection()
    for name, module in candidates(component, prefix, config):
        out_features, in_features = module.weight.shape[0], module.weight.shape[1]
        pattern = excluded_by(name, patterns)
        if pattern:
            out.skipped[name] = f"excluded ({pattern})"
        elif id(module) in unused:
            out.skipped[name] = "unused (its attention computes with the fused q/k/v copy)"
        elif id(module) in cross_kv:
            out.skipped[name] = "cross-attention key/value (quantize.cross_attention_kv=false)"
        elif min(in_features, out_features) < config.min_features:
            out.skipped[name] = f"small ({in_features}->{out_features} < min_features={config.min_features})"
        elif fp8 and (in_features % FP8_ALIGN or out_features % FP8_ALIGN):
            out.skipped[name] = f"fp8 needs features divisible by {FP8_ALIGN} ({in_features}->{out_features})"
        elif fp8 and (zeros := zero_rows(module.weight)):
            out.skipped[name] = (f"zero weight rows ({zeros} of {out_features}: torchao's fp8 row scale would be 0 "
                                 "and the row 0/0 = NaN)")
        else:
            out.chosen.append(name)
    if config.convs:
        _select_convs(component, prefix, config, patterns, out)
    return out


def _select_convs(component: nn.Module, prefix: str, config: QuantizeConfig, patterns: list[str],
                  out: Selection) -> None:
    """The spatial convolutions ``quantize.convs`` puts in 8 bits, by the same rules as linear layers."""
    from .conv8 import FP8, fits, is_spatial_conv

    dtype = FP8 if QuantizeMode(config.mode) == QuantizeMode.fp8 else torch.int8
    for path, module in component.named_modules():
        if not is_spatial_conv(module):
            continue
        name = f"{prefix}.{path}" if path else prefix
        pattern = excluded_by(name, patterns)
        reason = fits(module, dtype)
        if pattern:
            out.skipped[name] = f"excluded ({pattern})"
        elif min(module.in_channels, module.out_channels) < config.min_features:
            out.skipped[name] = (f"small ({module.in_channels}->{module.out_channels} < "
                                 f"min_features={config.min_features})")
        elif reason:
            out.skipped[name] = reason
        else:
            out.convs.append(name)
