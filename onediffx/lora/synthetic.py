"""Seeded LoRAs for a given pipeline, written as real files in kohya/A1111 format.

Benchmarks need LoRAs of the sizes real ones have for a model whose weights cannot be downloaded
(``model.synthetic=true``), and tests need files they know the exact content of. Both get them here:
random factors for the layers real LoRAs train (attention, feed-forward, projections, and for
LoCon the ResNet and sampler convolutions), sized so each layer's update is a set fraction of the
layer's own weights, and saved the way kohya's trainer names them (SGM block names for SDXL).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch

from .fit import lora_components
from .formats import LoraLayer, TargetKey

_LINEAR_LEAVES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj",
    "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2",
)
_CONV_LEAVES = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


def lora_targets(pipeline: Any, components: Iterable[str] = ("unet", "text_encoder", "text_encoder_2"),
                 conv: bool = True) -> Dict[TargetKey, torch.nn.Module]:
    """The layers a typical LoRA (``conv``: LoCon) trains, by (component, module path)."""
    found: Dict[TargetKey, torch.nn.Module] = {}
    available = lora_components(pipeline)
    for component in components:
        root = available.get(component)
        if root is None:
            continue
        for name, module in root.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(_LINEAR_LEAVES):
                found[(component, name)] = module
            elif conv and isinstance(module, torch.nn.Conv2d) and module.groups == 1 and name.endswith(_CONV_LEAVES):
                found[(component, name)] = module
    return found


def bytes_per_rank(targets: Dict[TargetKey, torch.nn.Module], dtype: torch.dtype = torch.float16) -> int:
    """File bytes one unit of rank costs over ``targets`` (down and up factors)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return sum((m.weight[0].numel() + m.weight.shape[0]) * size for m in targets.values())


def random_lora(targets: Dict[TargetKey, torch.nn.Module], rank: int, *, seed: int = 0, strength: float = 0.3,
                alpha: Optional[Callable[[TargetKey, int], float]] = None) -> Dict[TargetKey, LoraLayer]:
    """Seeded factors whose update has about ``strength`` times the weight's standard deviation.

    ``alpha(key, rank)`` sets each layer's stored alpha (default: the rank, i.e. scale 1); the
    factors are pre-divided by alpha/rank so the update's size does not depend on it.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for key, module in targets.items():
        weight = module.weight.detach()
        std = float(weight.float().std())  # on the weight's device: no full-size copy to the CPU
        out, fan_in = weight.shape[0], weight[0].numel()
        r = min(rank, out, fan_in)
        a = float(alpha(key, r)) if alpha else float(r)
        down = torch.randn(r, *weight.shape[1:], generator=gen) / math.sqrt(fan_in)
        up = torch.randn(out, r, generator=gen) * (strength * std * math.sqrt(fan_in / r) * r / a)
        if weight.dim() == 4:
            up = up[:, :, None, None]
        layers[key] = LoraLayer(down, up, a / r)
    return layers


def _sgm_name(path: str, layers_per_block: int) -> str:
    """diffusers UNet module path → the SGM (original SDXL) name kohya's trainer uses."""
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    resnet_inner = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                    "conv_shortcut": "skip_connection"}

    def resnet(rest: str) -> str:
        head, _, tail = rest.partition(".")
        return resnet_inner.get(head, head) + ("." + tail if tail else "")

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", path)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + block * per_down + layers_per_block}.0.op"
        index = 1 + block * per_down + j
        return f"input_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", path)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            return f"output_blocks.{block * per_up + layers_per_block}.2.{rest}"
        index = block * per_up + j
        return f"output_blocks.{index}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    return path


def kohya_state_dict(layers: Dict[TargetKey, LoraLayer], *, sgm_layers_per_block: Optional[int] = None,
                     te_prefixes: Tuple[str, str] = ("lora_te1_", "lora_te2_"),
                     dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Layers in kohya/A1111 naming, with ``.alpha``; SGM block names when ``sgm_layers_per_block``."""
    prefixes = {"unet": "lora_unet_", "text_encoder": te_prefixes[0], "text_encoder_2": te_prefixes[1]}
    out: Dict[str, torch.Tensor] = {}
    for (component, path), layer in layers.items():
        if component == "unet" and sgm_layers_per_block is not None:
            path = _sgm_name(path, sgm_layers_per_block)
        name = prefixes[component] + path.replace(".", "_")
        out[f"{name}.lora_down.weight"] = layer.down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=dtype)
    return out


def save_kohya(layers: Dict[TargetKey, LoraLayer], path: Union[str, Path], **kwargs: Any) -> Path:
    """Write ``kohya_state_dict(layers, **kwargs)`` as a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya_state_dict(layers, **kwargs), str(path))
    return path
