"""LoRA on attention layers whose projections are fused (diffusers' ``fuse_qkv_projections``).

A fused attention computes with ``to_qkv`` (``to_kv`` for cross-attention), a copy of the
concatenated ``to_q``/``to_k``/``to_v`` weights made when fusing. LoRA files name the separate
projections and onediffx fuses into those, so without this module a LoRA fused after
``fuse_qkv_projections`` (a runtime switch on a pipeline compiled with ``compile.fuse_qkv``) would
change weights nothing reads. ``sync`` copies the separate weights into the fused one, in place,
so compiled graphs and CUDA graphs read the result; only attentions whose projections changed
since the last sync are copied. Projections onediffx fused share the copy's memory
(``compile.fused_qkv.share_rows``) and need no copy; a quantized copy is re-quantized from them.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import nn

from ..compile.fused_qkv import joined, projections, shares_rows
from ..quantize.weights import is_quantized, requantize
from .fit import lora_components


def _fused_attentions(pipeline: Any) -> Iterator[Tuple[nn.Module, nn.Linear, List[nn.Linear]]]:
    """(attention, fused projection, its parts in row order) for each fused attention."""
    for component in lora_components(pipeline).values():
        for module in component.modules():
            if not getattr(module, "fused_projections", False):
                continue
            fused, parts = projections(module)
            if fused is not None:
                yield module, fused, parts


@torch.no_grad()
def sync(pipeline: Any, versions: Dict[int, Tuple[int, ...]]) -> int:
    """Copy changed ``to_q``/``to_k``/``to_v`` weights into their fused projection; return how many.

    ``versions`` holds, per attention, the parts' ``_version`` counters at its last sync.
    """
    synced = 0
    for attention, fused, parts in _fused_attentions(pipeline):
        now = tuple(part.weight._version for part in parts)
        if versions.get(id(attention)) == now:
            continue
        if shares_rows(fused, parts):  # the parts are the copy's rows: written already
            versions[id(attention)] = now
            continue
        if is_quantized(fused.weight):  # re-quantize the fused copy from its high-precision parts
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
