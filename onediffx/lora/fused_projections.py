"""LoRA on attention layers whose projections are fused (diffusers' ``fuse_qkv_projections``).

A fused attention computes with ``to_qkv`` (``to_kv`` for cross-attention), a copy of the
concatenated ``to_q``/``to_k``/``to_v`` weights made when fusing. LoRA files name the separate
projections and onediffx fuses into those, so without this module a LoRA fused after
``fuse_qkv_projections`` (a runtime switch on a pipeline compiled with ``compile.fuse_qkv``) would
change weights nothing reads. ``sync`` copies the separate weights into the fused one, in place,
so compiled graphs and CUDA graphs read the result; only attentions whose projections changed
since the last sync are copied. Projections onediffx fused share the copy's memory
(``fused_qkv.share_rows``) and need no copy. A quantized copy whose high-precision original
was kept is fused into directly (``fit.Target.into``), so its parts (the original's rows) never
change; one without (``keep_originals=none``) is re-quantized here from its parts.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, List, Tuple

import torch
from torch import nn

from ..fused_qkv import joined, projections, shares_rows, stacked_on
from ..quantized_weights import is_quantized, record_of, requantize
from .fit import lora_components
from .fuse import LoraState


def _attentions(pipeline: Any, state: LoraState) -> List[nn.Module]:
    """The modules that can fuse their projections (diffusers' ``Attention``), cached in ``state`` while
    the pipeline has the same components. Whether each one is fused is read again on every call
    (``fuse_qkv_projections`` is a runtime switch). The cache holds weak references: a replaced
    component is freed, and a new one at a freed one's address is not taken for it."""
    components = list(lora_components(pipeline).values())
    cached = state.attentions
    if (cached is None or len(cached[0]) != len(components)
            or any(ref() is not component for ref, component in zip(cached[0], components))):
        found = [m for c in components for m in c.modules() if hasattr(m, "fused_projections")]
        state.attentions = ([weakref.ref(c) for c in components], [weakref.ref(m) for m in found])
    return [m for m in (ref() for ref in state.attentions[1]) if m is not None]


def _fused_attentions(pipeline: Any, state: LoraState) -> Iterator[Tuple[nn.Module, nn.Linear, List[nn.Linear]]]:
    """(attention, fused projection, its parts in row order) for each fused attention."""
    for module in _attentions(pipeline, state):
        if getattr(module, "fused_projections", False):
            fused, parts = projections(module)
            if fused is not None:
                yield module, fused, parts


@torch.no_grad()
def sync(pipeline: Any, state: LoraState) -> int:
    """Copy changed ``to_q``/``to_k``/``to_v`` weights into their fused projection; return how many.

    ``state.projection_versions`` holds, per attention, the parts' ``_version`` counters at its last sync.
    """
    versions = state.projection_versions
    synced = 0
    for attention, fused, parts in _fused_attentions(pipeline, state):
        now = tuple(part.weight._version for part in parts)
        if versions.get(id(attention)) == now:
            continue
        if shares_rows(fused, parts):  # the parts are the copy's rows: written already
            versions[id(attention)] = now
            continue
        if is_quantized(fused.weight):  # re-quantize the fused copy from its high-precision parts
            original = record_of(fused.weight).original
            if id(attention) not in versions and original is not None and stacked_on(parts, original):
                versions[id(attention)] = now  # the parts are the original the copy was quantized from
                continue
            requantize(fused.weight, joined(parts))
            versions[id(attention)] = now
            synced += 1
            continue
        row = 0
        for part in parts:
            rows = part.weight.shape[0]
            fused.weight[row:row + rows].copy_(part.weight)
            row += rows
        versions[id(attention)] = now
        synced += 1
    return synced
