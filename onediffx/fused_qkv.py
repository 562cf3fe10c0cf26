"""Fused q/k/v projections that follow the weights a user loads.

diffusers' ``fuse_qkv_projections`` gives each attention a concatenated copy of its projections
(``to_qkv``, or ``to_kv`` for cross-attention) and then computes with the copy alone. A state dict
of the unfused architecture (every checkpoint) has no such keys, so ``load_state_dict`` would fail
on them, or with ``strict=False`` leave the copy stale while the compiled graph keeps reading it.
A load pre-hook on each fused attention builds the copy from the incoming projections, so loading
another state dict into a compiled component (graph re-use, no recompile) works with fused
projections too. LoRA fusing keeps the copy in sync separately (``lora/fused_projections.py``).

diffusers keeps the separate projections beside the copy, which on SDXL is 1.2 GiB of weights held
twice (every self-attention's q/k/v and every cross-attention's k/v). ``fuse_qkv`` points each
separate weight at its rows of the copy instead (``share_rows``): nothing computes with the
separate projections, LoRA files name them, and a LoRA fused into them now lands in the copy itself.

Compiling, quantizing and LoRA fusing all work on these copies, so this module sits below the three
and imports none of them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .state import FILLS_FUSED


def _fill_fused(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    cross = bool(getattr(module, "is_cross_attention", False))
    fused, parts = ("to_kv", ("to_k", "to_v")) if cross else ("to_qkv", ("to_q", "to_k", "to_v"))
    for kind in ("weight", "bias"):
        target, sources = f"{prefix}{fused}.{kind}", [f"{prefix}{part}.{kind}" for part in parts]
        if target not in state_dict and all(source in state_dict for source in sources):
            state_dict[target] = torch.cat([state_dict[source] for source in sources])


def projections(attention: nn.Module) -> tuple[Optional[nn.Linear], list[nn.Linear]]:
    """(the fused copy, the separate projections in its row order) of a fused attention."""
    if getattr(attention, "is_cross_attention", False):
        return getattr(attention, "to_kv", None), [attention.to_k, attention.to_v]
    return getattr(attention, "to_qkv", None), [attention.to_q, attention.to_k, attention.to_v]


def row_in_copy(attention: nn.Module, part: nn.Module) -> Optional[tuple[str, int]]:
    """(the fused copy's name in ``attention``, the first row of ``part`` in it), when ``part`` is one
    of the projections ``attention`` computes with a fused copy of; else ``None``."""
    if not getattr(attention, "fused_projections", False):
        return None
    fused, parts = projections(attention)
    row = 0
    for candidate in parts if fused is not None else ():
        if candidate is part:
            return ("to_kv" if len(parts) == 2 else "to_qkv"), row
        row += candidate.weight.shape[0]
    return None


def _rows(base: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows ``start:start + rows`` of ``base``, as a tensor of its own over the same memory.

    Not a view: views share their base's version counter, and LoRA fusing tells its own writes
    from anyone else's by each weight's counter; a write to ``to_k`` must not look like a write to ``to_q``.
    """
    offset = base.storage_offset() + start * base.stride(0)
    return torch.empty(0, dtype=base.dtype, device=base.device).set_(
        base.untyped_storage(), offset, (rows, *base.shape[1:]), base.stride())


def share_rows(fused: nn.Linear, parts: list[nn.Linear], source: Optional[torch.Tensor] = None) -> None:
    """Point each part's weight and bias at its rows of the fused weight and bias.

    ``source`` replaces the fused weight as the rows' owner: a quantized copy's high-precision
    original, which then is the one high-precision copy of these projections.
    """
    weight = (fused.weight if source is None else source).detach()
    row = 0
    for part in parts:
        rows = part.weight.shape[0]
        part.weight = nn.Parameter(_rows(weight, row, rows), requires_grad=False)
        if part.bias is not None and fused.bias is not None:
            part.bias = nn.Parameter(_rows(fused.bias.detach(), row, rows), requires_grad=False)
        row += rows


def stacked_on(parts: list[nn.Linear], base: torch.Tensor) -> bool:
    """Whether the parts' weights lie in ``base``'s memory, one after another from ``base``'s first row."""
    storage, offset = base.untyped_storage().data_ptr(), base.storage_offset()
    for part in parts:
        weight = part.weight
        if (weight.device != base.device or weight.untyped_storage().data_ptr() != storage
                or weight.storage_offset() != offset or not weight.is_contiguous()):
            return False
        offset += weight.numel()
    return True


def joined(parts: list[nn.Linear]) -> torch.Tensor:
    """The parts' weights stacked in row order: the memory they share when ``share_rows`` put them
    one after another, else a concatenated copy."""
    first = parts[0].weight.detach()
    if first.is_contiguous() and stacked_on(parts, first):
        return _rows(first, 0, sum(part.weight.shape[0] for part in parts))
    return torch.cat([part.weight for part in parts])


def shares_rows(fused: nn.Linear, parts: list[nn.Linear]) -> bool:
    """Whether the parts' weights are the fused weight's rows (``share_rows``, not undone by a ``.to``)."""
    weight = fused.weight
    return not hasattr(weight, "tensor_data_names") and weight.is_contiguous() and stacked_on(parts, weight)


def fuse_qkv(module: nn.Module) -> int:
    """Fuse the module's attention projections; return how many attentions load-fill their copy.

    Projections fused here share their copy's memory (``share_rows``); ones a caller fused before
    (diffusers' ``fuse_qkv_projections``) are left as they are. Joint-attention transformers (FLUX,
    SD3) stay unfused (``joint_attention``).
    """
    if joint_attention(module):
        return 0
    if not any(getattr(m, "fused_projections", False) for m in module.modules()):  # fusing twice reallocates
        if any(hasattr(getattr(getattr(m, "to_q", None), "weight", None), "tensor_data_names") for m in module.modules()):
            from ..errors import ConfigError  # torchao's tensors cannot be concatenated

            raise ConfigError("compile.fuse_qkv: the attention projections are quantized; quantize with "
                              "fuse_qkv=true (the default, fuses them first) or compile with fuse_qkv=false")
        if any(hasattr(p, "to_k_ip") for p in getattr(module, "attn_processors", {}).values()):
            _fuse_plain_attentions(module)
        else:
            module.fuse_qkv_projections()
        for attention in module.modules():  # only copies fused here: a LoRA may be fused into older ones
            fused, parts = projections(attention) if getattr(attention, "fused_projections", False) else (None, [])
            if fused is not None:
                share_rows(fused, parts)
    hooked = 0
    for attention in module.modules():
        if getattr(attention, "fused_projections", False) and not FILLS_FUSED.get(attention, False):
            attention.register_load_state_dict_pre_hook(_fill_fused)
            FILLS_FUSED.set(attention, True)
            hooked += 1
    return hooked


def joint_attention(module: nn.Module) -> bool:
    """Whether ``module`` has attentions with context projections (``add_q_proj``: FLUX, SD3).

    Fusing gives those a second copy (``to_added_qkv``) that neither the load pre-hook nor LoRA's
    sync refills, so another checkpoint or a LoRA would leave compiled graphs reading stale context
    weights; and diffusers' fused joint processor fails on SD3.5's self-only second attention.
    """
    return any(getattr(m, "add_q_proj", None) is not None for m in module.modules())


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
