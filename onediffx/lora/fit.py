"""Checking a parsed LoRA against a pipeline, before any weight changes.

A LoRA made for another base model (SD 1.5 on SDXL) shows up here as layers the pipeline lacks or
layers whose shapes differ; either way the whole LoRA is refused with one line that says how
much did not fit and gives an example, so a failed load never leaves a half-fused pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..fused_qkv import row_in_copy
from ..quantized_weights import record_of
from .errors import LoraError, LoraMismatchError
from .formats import LoraLayer, TargetKey

_ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
"""Attention inputs that ``fuse_qkv_projections`` stops using and ``fused_projections.sync`` does not
copy into the fused weight (to_q/k/v it does)."""
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")


@dataclass
class Target:
    """A pipeline weight a LoRA changes, with the LoRA's factors flattened for one matmul."""

    param: torch.nn.Parameter
    """The weight the update is added to: the layer's own, or the quantized fused copy its rows are in (``into``)."""
    up: torch.Tensor
    """(out, rank): the file's dtype when it is the weight's, else float32 (see ``factor_dtype``)."""
    down: torch.Tensor
    """(rank, in * kh * kw), same dtype rule as ``up``."""
    scale: float
    float32: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)
    """float32 copies of fp16/bf16 factors, made the first time the float32 path needs them (see fuse)."""
    into: Optional[TargetKey] = None
    """The quantized fused q/k/v copy (``to_qkv``/``to_kv``) whose rows this layer's projection is, when
    it is one: fusing then re-quantizes the copy from its high-precision original plus the update of
    each of its parts, on the device, and the separate projection (that original's rows) is not written."""
    row: int = 0
    """The first of this layer's rows in ``param``: non-zero only for a part of a fused copy (``into``)."""


def _flat(factor: torch.Tensor, weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A factor as the 2-D matrix ``fuse`` multiplies, on ``device`` in ``factor_dtype`` (views where possible)."""
    if factor.dim() != 2:  # convolutions: (out, rank, 1, 1) and (rank, in, kh, kw)
        factor = factor.reshape(factor.shape[0], -1)
    return factor.to(device, factor_dtype(factor, weight))


def factor_dtype(factor: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Keep factors in the weight's dtype when they already are: ``fuse`` then needs no conversion
    and can add them with one matmul in that dtype. Anything else becomes float32, which holds every
    fp16/bf16 value exactly, so no factor is ever rounded to a coarser type.
    """
    return factor.dtype if factor.dtype == weight.dtype else torch.float32


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
    fan_in = math.prod(weight.shape[1:])  # not weight[0].numel(): that is a tensor op per layer
    if layer.up.shape[0] != out or layer.up.numel() != out * rank:
        return f"up {tuple(layer.up.shape)} vs weight {tuple(weight.shape)}"
    if layer.down.numel() != rank * fan_in:
        return f"down {tuple(layer.down.shape)} vs weight {tuple(weight.shape)}"
    if layer.down.dim() == 4 and weight.dim() == 4 and layer.down.shape[1:] != weight.shape[1:]:
        return f"down {tuple(layer.down.shape)} vs weight {tuple(weight.shape)}"
    if layer.down.dim() == 2 and weight.dim() == 4 and weight.shape[2:] != (1, 1):
        return f"linear down {tuple(layer.down.shape)} for a {tuple(weight.shape[2:])} convolution"
    return None


class _ModuleIndex:
    """Submodules by (component, dotted path), each parent looked up once per ``fit``.

    A LoRA names about a thousand modules that share most of their parents; walking ``_modules``
    with a cache of the parents seen costs a dict lookup or two per layer, where indexing the whole
    tree with ``named_modules()`` first visits every module of the UNet and text encoders.
    """

    def __init__(self, components: Dict[str, torch.nn.Module]) -> None:
        self._found: Dict[TargetKey, Optional[torch.nn.Module]] = {(c, ""): m for c, m in components.items()}

    def get(self, component: str, path: str) -> Optional[torch.nn.Module]:
        key = (component, path)
        if key not in self._found:
            parent_path, _, leaf = path.rpartition(".")
            parent = self.get(component, parent_path) if path else None
            self._found[key] = parent._modules.get(leaf) if isinstance(parent, torch.nn.Module) else None
        return self._found[key]


def _quantized_copy(index: _ModuleIndex, component: str, parent: str, module: torch.nn.Module
                    ) -> Optional[Tuple[TargetKey, int, torch.nn.Parameter]]:
    """(key, first row, weight) of the quantized fused copy that ``module`` is a part of, if any.

    Only copies whose high-precision original was kept: without one, the separate projection is the
    only high-precision copy, and fusing writes it and re-quantizes the copy from it (``fused_projections``).
    """
    attention = index.get(component, parent)
    found = row_in_copy(attention, module) if attention is not None else None
    if found is None:
        return None
    name, row = found
    weight = getattr(attention, name).weight
    record = record_of(weight)
    if record is None or record.original is None:
        return None
    return (component, f"{parent}.{name}" if parent else name), row, weight


def calibrated_refusal(layer: str) -> LoraError:
    """Why no LoRA is fused into ``layer``: its input scale was calibrated (``quantize.calibrate``)."""
    return LoraError(f"LoRA: {layer} has a calibrated activation scale (quantize.calibrate), which a fused LoRA "
                     "would push past and clip; quantize with dynamic scales (quantize=fp8 or int8, "
                     "calibrate.prompts=0) to fuse and switch LoRAs")


def fit(layers: Dict[TargetKey, LoraLayer], pipeline: Any, label: str, device: torch.device
        ) -> Dict[TargetKey, Target]:
    """Match every layer to a pipeline weight; ``LoraMismatchError`` if any does not match."""
    index = _ModuleIndex(lora_components(pipeline))
    missing: List[str] = []
    mismatched: List[str] = []
    targets: Dict[TargetKey, Target] = {}
    for (component, path), layer in layers.items():
        module = index.get(component, path)
        weight = getattr(module, "weight", None)
        record = record_of(weight)
        if record is not None and record.static:  # an 8-bit convolution (quantize.convs) is neither class below
            raise calibrated_refusal(record.name)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not isinstance(weight, torch.nn.Parameter):
            missing.append(f"{component}.{path}")
            continue
        parent, _, leaf = path.rpartition(".")
        if leaf in _ADDED_QKV and getattr(index.get(component, parent), "fused_projections", False):
            raise LoraMismatchError(
                f"LoRA {label} changes {component}.{path}, but that attention's added projections are fused "
                f"(compile.fuse_qkv) and it is no longer read; fuse LoRAs before fusing QKV, or unfuse QKV first"
            )
        if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
            mismatched.append(f"{component}.{path} (grouped convolution)")
            continue
        if record is not None and record.original is None:  # refused before any weight changes
            raise LoraError(f"LoRA {label} changes {component}.{path}, which is quantized without its "
                            "high-precision weights (quantize.keep_originals=none); quantize with keep_originals=cpu "
                            "or device to fuse LoRAs")
        why = _expected(layer, weight)
        if why:
            mismatched.append(f"{component}.{path} ({why})")
            continue
        target = Target(weight, _flat(layer.up, weight, device), _flat(layer.down, weight, device), layer.scale)
        copy = _quantized_copy(index, component, parent, module)
        if copy is not None:
            target.into, target.row, target.param = copy
        targets[(component, path)] = target
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
