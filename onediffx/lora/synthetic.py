"""Seeded LoRAs for a given pipeline, written as real files in the formats people publish.

Benchmarks need LoRAs of the sizes real ones have for a model whose weights cannot be downloaded
(``model.synthetic=true``), and tests need files they know the exact content of. Both get them here:
random factors for the layers real LoRAs train (attention, feed-forward, projections, and for
LoCon the ResNet and sampler convolutions; for FLUX and SD3 the layers inside the transformer
blocks), sized so each layer's update is a set fraction of the layer's own weights, and saved the
way kohya's trainer names them (SGM block names for SDXL; BFL names for FLUX), in diffusers' own
format, or XLabs' (``flux_formats``).
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
_TRANSFORMER_LEAVES = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)
"""FLUX's and SD3's block layers that LoRA trainers (ai-toolkit, kohya, diffusers' scripts) train."""
_TRANSFORMER_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def _is_target(component: str, name: str, module: torch.nn.Module, conv: bool) -> bool:
    if component == "transformer":
        return isinstance(module, torch.nn.Linear) and name.startswith(_TRANSFORMER_BLOCKS) and name.endswith(
            _TRANSFORMER_LEAVES)
    if isinstance(module, torch.nn.Linear):
        return name.endswith(_LINEAR_LEAVES)
    return conv and isinstance(module, torch.nn.Conv2d) and module.groups == 1 and name.endswith(_CONV_LEAVES)


def lora_targets(pipeline: Any,
                 components: Iterable[str] = ("unet", "transformer", "text_encoder", "text_encoder_2"),
                 conv: bool = True) -> Dict[TargetKey, torch.nn.Module]:
    """The layers a typical LoRA (``conv``: LoCon) trains, by (component, module path)."""
    found: Dict[TargetKey, torch.nn.Module] = {}
    available = lora_components(pipeline)
    for component in components:
        root = available.get(component)
        if root is None:
            continue
        for name, module in root.named_modules():
            if _is_target(component, name, module, conv):
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


def save_state_dict(state_dict: Dict[str, torch.Tensor], path: Union[str, Path]) -> Path:
    """Write a LoRA state dict (any of the ``*_state_dict`` writers here) as a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def diffusers_state_dict(layers: Dict[TargetKey, LoraLayer], dtype: torch.dtype = torch.float32
                         ) -> Dict[str, torch.Tensor]:
    """diffusers/PEFT naming (``transformer.<module>.lora_A.weight``); a scale other than 1 is stored as
    ``<module>.alpha``, as FLUX files trained outside diffusers carry it (``FluxPipeline`` reads those;
    ``StableDiffusion3Pipeline`` refuses keys without ``lora`` in them, so give SD3 layers scale 1)."""
    out: Dict[str, torch.Tensor] = {}
    for (component, path), layer in layers.items():
        name = f"{component}.{path}"
        out[f"{name}.lora_A.weight"] = layer.down.to(dtype)
        out[f"{name}.lora_B.weight"] = layer.up.to(dtype)
        if layer.scale != 1.0:
            out[f"{name}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=dtype)
    return out


_FLUX_DOUBLE = {
    "attn.to_q": "img_attn_qkv", "attn.to_k": "img_attn_qkv", "attn.to_v": "img_attn_qkv",
    "attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
    "norm1.linear": "img_mod_lin", "attn.add_q_proj": "txt_attn_qkv", "attn.add_k_proj": "txt_attn_qkv",
    "attn.add_v_proj": "txt_attn_qkv", "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0",
    "ff_context.net.2": "txt_mlp_2", "norm1_context.linear": "txt_mod_lin",
}
_FLUX_SINGLE = {"attn.to_q": "linear1", "attn.to_k": "linear1", "attn.to_v": "linear1", "proj_mlp": "linear1",
                "proj_out": "linear2", "norm.linear": "modulation_lin"}
_FUSED_PARTS = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_XLABS = {"img_attn_qkv": "qkv_lora1", "img_attn_proj": "proj_lora1", "txt_attn_qkv": "qkv_lora2",
          "txt_attn_proj": "proj_lora2"}


def _bfl_layers(layers: Dict[TargetKey, LoraLayer]) -> Dict[Tuple[str, int, str], LoraLayer]:
    """FLUX transformer layers under BFL's names: (``double_blocks``/``single_blocks``, index, layer).

    BFL computes q, k and v (and in single blocks the MLP input) with one fused linear, so one BFL
    layer holds several diffusers layers: written block-diagonally (the parts' downs stacked, each
    up in its own rows and rank columns), which is the same update exactly, and which diffusers'
    converters split back into the parts.
    """
    grouped: Dict[Tuple[str, int, str], Dict[str, LoraLayer]] = {}
    for (component, path), layer in layers.items():
        m = re.match(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)$", path)
        names = _FLUX_SINGLE if m and m[1].startswith("single") else _FLUX_DOUBLE
        if component != "transformer" or m is None or m[3] not in names:
            raise ValueError(f"transformer.{path} has no BFL name onediffx writes" if component == "transformer"
                             else f"{component}.{path}: only the transformer's layers have BFL names")
        kind = "single_blocks" if m[1].startswith("single") else "double_blocks"
        grouped.setdefault((kind, int(m[2]), names[m[3]]), {})[m[3]] = layer
    out = {}
    for (kind, index, name), parts in grouped.items():
        order = _FUSED_PARTS.get(name)
        if order is None:
            out[(kind, index, name)] = next(iter(parts.values()))
            continue
        if set(parts) != set(order):
            raise ValueError(f"{kind}.{index}.{name} fuses {', '.join(order)}: give all of them or none")
        out[(kind, index, name)] = _block_diagonal([parts[p] for p in order], f"{kind}.{index}.{name}")
    return out


def _block_diagonal(parts: list, name: str) -> LoraLayer:
    if len({p.scale for p in parts}) != 1:
        raise ValueError(f"{name}: its parts have different alpha/rank, which one fused layer cannot store")
    down = torch.cat([p.down for p in parts])
    up = torch.zeros(sum(p.up.shape[0] for p in parts), down.shape[0], dtype=parts[0].up.dtype)
    row = col = 0
    for p in parts:
        up[row:row + p.up.shape[0], col:col + p.rank] = p.up
        row, col = row + p.up.shape[0], col + p.rank
    return LoraLayer(down, up, parts[0].scale)


def kohya_flux_state_dict(layers: Dict[TargetKey, LoraLayer], *, names: str = "bfl",
                          dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """FLUX layers in kohya naming with ``.alpha``: ``names="bfl"`` as sd-scripts writes them
    (``lora_unet_double_blocks_0_img_attn_qkv``; diffusers' converter takes single blocks' ``linear1``
    only at FLUX.1's full size), ``names="diffusers"`` as other trainers do
    (``lora_transformer_transformer_blocks_0_attn_to_q``; diffusers maps only attention layers of those).
    CLIP layers are ``lora_te1_`` in both."""
    if names not in ("bfl", "diffusers"):
        raise ValueError(f"names must be 'bfl' or 'diffusers', not {names!r}")
    clip = {k: v for k, v in layers.items() if k[0] == "text_encoder"}
    own = {k: v for k, v in layers.items() if k[0] != "text_encoder"}
    # kohya names CLIP layers from ``text_model`` down, whether or not transformers' class has that level.
    flat = {f"lora_te1_{('text_model.' + p.removeprefix('text_model.')).replace('.', '_')}": v
            for (_, p), v in clip.items()}
    if names == "bfl":
        flat.update((f"lora_unet_{kind}_{i}_{name}", v) for (kind, i, name), v in _bfl_layers(own).items())
    else:
        flat.update((f"lora_{c}_{p.replace('.', '_')}", v) for (c, p), v in own.items())
    out: Dict[str, torch.Tensor] = {}
    for name, layer in flat.items():
        out[f"{name}.lora_down.weight"] = layer.down.to(dtype)
        out[f"{name}.lora_up.weight"] = layer.up.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=dtype)
    return out


def xlabs_state_dict(layers: Dict[TargetKey, LoraLayer], dtype: torch.dtype = torch.float32
                     ) -> Dict[str, torch.Tensor]:
    """FLUX double-block attention layers as XLabs' trainer names them
    (``double_blocks.0.processor.qkv_lora1.down.weight``). XLabs files store no alpha, so each
    layer's scale is multiplied into its up factor."""
    out: Dict[str, torch.Tensor] = {}
    for (kind, index, name), layer in _bfl_layers(layers).items():
        if kind != "double_blocks" or name not in _XLABS:
            raise ValueError(f"{kind}.{index}.{name}: XLabs LoRAs hold double blocks' attention layers only")
        key = f"double_blocks.{index}.processor.{_XLABS[name]}"
        out[f"{key}.down.weight"] = layer.down.to(dtype)
        out[f"{key}.up.weight"] = (layer.up * layer.scale).to(dtype)
    return out


def save_published(pipeline: Any, layers: Dict[TargetKey, LoraLayer], path: Union[str, Path],
                   dtype: torch.dtype = torch.float16) -> Path:
    """``layers`` in the format most LoRAs for ``pipeline`` are published in: kohya for a UNet (SGM
    names for SDXL, ``lora_te_`` for SD 1.x/2.x), diffusers for a transformer (FLUX.1, SD3.5), which
    is the one format both of their diffusers loaders read (SD3's takes no kohya or ``.alpha`` keys:
    give it layers of scale 1)."""
    components = lora_components(pipeline)
    unet = components.get("unet")
    if unet is None:
        return save_state_dict(diffusers_state_dict(layers, dtype), path)
    if "text_encoder_2" in components:
        return save_kohya(layers, path, sgm_layers_per_block=unet.config.layers_per_block, dtype=dtype)
    return save_kohya(layers, path, te_prefixes=("lora_te_", ""), dtype=dtype)
