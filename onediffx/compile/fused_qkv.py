"""Fused q/k/v projections that follow the weights a user loads.

diffusers' ``fuse_qkv_projections`` gives each attention a concatenated copy of its projections
(``to_qkv``, or ``to_kv`` for cross-attention) and then computes with the copy alone. A state dict
of the unfused architecture (every checkpoint) has no such keys, so ``load_state_dict`` would fail
on them, or with ``strict=False`` leave the copy stale while the compiled graph keeps reading it.
A load pre-hook on each fused attention builds the copy from the incoming projections, so loading
another state dict into a compiled component (graph re-use, no recompile) works with fused
projections too. LoRA fusing keeps the copy in sync separately (``lora/fused_projections.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MARK = "_onediffx_fills_fused"


def _fill_fused(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    cross = bool(getattr(module, "is_cross_attention", False))
    fused, parts = ("to_kv", ("to_k", "to_v")) if cross else ("to_qkv", ("to_q", "to_k", "to_v"))
    for kind in ("weight", "bias"):
        target, sources = f"{prefix}{fused}.{kind}", [f"{prefix}{part}.{kind}" for part in parts]
        if target not in state_dict and all(source in state_dict for source in sources):
            state_dict[target] = torch.cat([state_dict[source] for source in sources])


def fuse_qkv(module: nn.Module) -> int:
    """Fuse the module's attention projections; return how many attentions load-fill their copy."""
    if not any(getattr(m, "fused_projections", False) for m in module.modules()):  # fusing twice reallocates
        if any(hasattr(getattr(getattr(m, "to_q", None), "weight", None), "tensor_data_names") for m in module.modules()):
            from ..errors import ConfigError  # torchao's tensors cannot be concatenated

            raise ConfigError("compile.fuse_qkv: the attention projections are quantized; quantize with "
                              "fuse_qkv=true (the default, fuses them first) or compile with fuse_qkv=false")
        if any(hasattr(p, "to_k_ip") for p in getattr(module, "attn_processors", {}).values()):
            _fuse_plain_attentions(module)
        else:
            module.fuse_qkv_projections()
    hooked = 0
    for attention in module.modules():
        if getattr(attention, "fused_projections", False) and not getattr(attention, MARK, False):
            attention.register_load_state_dict_pre_hook(_fill_fused)
            setattr(attention, MARK, True)
            hooked += 1
    return hooked


def _fuse_plain_attentions(module: nn.Module) -> None:
    """Fuse only the attentions that run diffusers' plain processor (IP-Adapter UNets: InstantID).

    ``fuse_qkv_projections`` sets one fused processor on every attention, which would drop the
    IP-Adapter processors (``to_k_ip``/``to_v_ip``) and break the Resampler's attention inside
    ``encoder_hid_proj``; those keep their unfused projections and processors.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    projection = getattr(module, "encoder_hid_proj", None)
    inside = {id(m) for m in projection.modules()} if projection is not None else set()
    for attention in module.modules():
        if isinstance(attention, Attention) and id(attention) not in inside and type(attention.processor) is AttnProcessor2_0:
            attention.fuse_projections(fuse=True)
            attention.set_processor(FusedAttnProcessor2_0())
