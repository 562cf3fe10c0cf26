"""Checking a parsed LoRA against a pipeline, before any weight changes.

A LoRA made for another base model (SD 1.5 on SDXL) shows up here as layers the pipeline lacks or
layers whose shapes differ; either way the whole LoRA is refused with one line that says how
much did not fit and gives an example, so a failed load never leaves a half-fused pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .errors import LoraMismatchError
from .formats import LoraLayer, TargetKey

_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
"""Attention inputs that diffusers' ``fuse_qkv_projections`` stops using (it reads a fused copy)."""
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")


@dataclass
class Target:
    """A pipeline weight a LoRA changes, with the LoRA's factors flattened for one matmul."""

    param: torch.nn.Parameter
    up: torch.Tensor
    """(out, rank), float32."""
    down: torch.Tensor
    """(rank, in * kh * kw), float32."""
    scale: float


def unwrap(module: Any) -> Any:
    """The eager module behind a ``torch.compile`` wrapper (its parameters are the ones to update)."""
    return getattr(module, "_orig_mod", module)


def lora_components(pipeline: Any) -> Dict[str, torch.nn.Module]:
    """The pipeline's modules a LoRA can target, by the names LoRA files use for them."""
    found = {}
    for name in LORA_COMPONENTS:
        module = unwrap(getattr(pipeline, name, None))
        if isinstance(module, torch.nn.Module):
            found[name] = module
    return found


def _expected(layer: LoraLayer, weight: torch.Tensor) -> Optional[str]:
    """Why ``layer`` cannot update ``weight``, or None if it can."""
    out, rank = weight.shape[0], layer.rank
    fan_in = weight[0].numel()
    if layer.up.shape[0] != out or layer.up.numel() != out * rank:
        return f"up {tuple(layer.up.shape)} vs weight {tuple(weight.shape)}"
    if layer.down.numel() != rank * fan_in:
        return f"down {tuple(layer.down.shape)} vs weight {tuple(weight.shape)}"
    if layer.down.dim() == 4 and weight.dim() == 4 and layer.down.shape[1:] != weight.shape[1:]:
        return f"down {tuple(layer.down.shape)} vs weight {tuple(weight.shape)}"
    if layer.down.dim() == 2 and weight.dim() == 4 and weight.shape[2:] != (1, 1):
        return f"linear down {tuple(layer.down.shape)} for a {tuple(weight.shape[2:])} convolution"
    return None


def fit(layers: Dict[TargetKey, LoraLayer], pipeline: Any, label: str, device: torch.device
        ) -> Dict[TargetKey, Target]:
    """Match every layer to a pipeline weight; ``LoraMismatchError`` if any does not match."""
    components = lora_components(pipeline)
    # One index per component: a dict lookup per layer instead of get_submodule's attribute walk.
    index = {name: dict(components[name].named_modules()) for name in {c for c, _ in layers} if name in components}
    missing: List[str] = []
    mismatched: List[str] = []
    targets: Dict[TargetKey, Target] = {}
    for (component, path), layer in layers.items():
        module = index.get(component, {}).get(path)
        weight = getattr(module, "weight", None)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not isinstance(weight, torch.nn.Parameter):
            missing.append(f"{component}.{path}")
            continue
        parent, _, leaf = path.rpartition(".")
        if leaf in _QKV and getattr(index[component].get(parent), "fused_projections", False):
            raise LoraMismatchError(
                f"LoRA {label} changes {component}.{path}, but that attention's QKV projections are fused "
                f"(compile.fuse_qkv) and it is no longer read; fuse LoRAs before fusing QKV, or unfuse QKV first"
            )
        if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
            mismatched.append(f"{component}.{path} (grouped convolution)")
            continue
        why = _expected(layer, weight)
        if why:
            mismatched.append(f"{component}.{path} ({why})")
            continue
        rank = layer.rank
        targets[(component, path)] = Target(
            weight,
            layer.up.reshape(weight.shape[0], rank).to(device=device, dtype=torch.float32),
            layer.down.reshape(rank, -1).to(device=device, dtype=torch.float32),
            layer.scale,
        )
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} layer(s) not in this pipeline (e.g. {missing[0]})")
        if mismatched:
            parts.append(f"{len(mismatched)} of other shape (e.g. {mismatched[0]})")
        raise LoraMismatchError(
            f"LoRA {label} does not fit this {type(pipeline).__name__}: {len(layers)} layers, "
            f"{' and '.join(parts)}; it was probably made for another base model"
        )
    return targets
