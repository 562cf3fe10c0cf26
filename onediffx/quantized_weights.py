"""Quantized weights that can be rewritten in place: what LoRA fusing needs from quantization.

A compiled graph reads a quantized weight's inner tensors (torchao's ``qdata`` and ``scale``) as
inputs, so a new value reaches the graph only if it is copied into those same tensors. Each weight
``quantize_pipe`` quantizes gets a ``QuantizedWeight`` record here: the torchao config that made
it and, unless told otherwise, its high-precision original. ``requantize`` quantizes a new
high-precision value with that config and copies the result in; ``snapshot``/``restore`` save and
put back the quantized tensors bit for bit.

Quantizing writes these records and LoRA fusing reads them, so the module sits below both and
imports neither.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn


@dataclass(eq=False)
class QuantizedWeight:
    """How one weight was quantized, and its high-precision original (``None`` when not kept)."""

    name: str
    config: Any
    dtype: torch.dtype
    original: Optional[torch.Tensor]
    shape: tuple = ()

    @property
    def static(self) -> bool:
        """Whether its activations have a calibrated (static) scale rather than one computed per call."""
        return getattr(self.config, "act_quant_scale", None) is not None


EIGHT_BIT = (torch.float8_e4m3fn, torch.int8)

_RECORDS: "weakref.WeakValueDictionary[int, QuantizedWeight]" = weakref.WeakValueDictionary()
"""Records by ``id`` of their weight. The pipeline's ``QuantizeState`` owns the records, so they
live as long as it does; the weights themselves are not referenced here (a weak reference to a
parameter would stop ``Module.to`` from swapping its tensor in place)."""


def register(param: torch.Tensor, record: QuantizedWeight) -> None:
    record.shape = tuple(param.shape)
    _RECORDS[id(param)] = record


def record_of(param: Any) -> Optional[QuantizedWeight]:
    """The record of a weight ``quantize_pipe`` quantized, or ``None`` for any other tensor.

    Quantized weights are torchao tensor subclasses, or plain 8-bit tensors (``quantize.convs``): a
    16-bit tensor that happens to reuse a freed weight's ``id`` is never taken for it.
    """
    if not isinstance(param, torch.Tensor) or not (hasattr(param, "tensor_data_names") or param.dtype in EIGHT_BIT):
        return None
    record = _RECORDS.get(id(param))
    return record if record is not None and record.shape == tuple(param.shape) else None


def is_quantized(param: torch.Tensor) -> bool:
    return record_of(param) is not None


def inner_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a torchao tensor subclass is made of (what a compiled graph reads)."""
    names = list(getattr(param, "tensor_data_names", ())) + list(getattr(param, "optional_tensor_data_names", ()))
    return [t for t in (getattr(param, n, None) for n in names) if isinstance(t, torch.Tensor)]


def quantize_tensor(config: Any, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized as torchao's ``quantize_`` would quantize a linear layer holding it."""
    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

    holder = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(holder)
    holder.in_features, holder.out_features = weight.shape[1], weight.shape[0]
    holder.weight = nn.Parameter(weight, requires_grad=False)
    holder.bias = None
    return _QUANTIZE_CONFIG_HANDLER[type(config)](holder, config).weight


@functools.lru_cache(maxsize=None)
def _float8_torch_path() -> Optional[tuple]:
    """torchao's ``Float8Tensor`` and the two functions its ``from_hp`` quantizes with on its plain-torch
    path; ``None`` where ``from_hp`` would take another kernel (``mslk``) or torchao lacks them."""
    try:
        from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8
        from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor
        from torchao.utils import _is_mslk_available
    except ImportError:
        return None
    return None if _is_mslk_available() else (Float8Tensor, _choose_scale_float8, _quantize_affine_float8)


def _requantize_float8(param: torch.Tensor, weight: torch.Tensor) -> bool:
    """Scale and cast an fp8 weight with torchao's own functions, straight into its inner tensors.

    The same bits as ``quantize_tensor``, without building a module and a tensor subclass per weight:
    that costs about 0.2 ms of Python a weight, and one LoRA switch on SDXL re-quantizes about 400.
    """
    path = _float8_torch_path()
    if path is None or not isinstance(param, path[0]) or param.block_size is None:
        return False
    _, choose_scale, quantize = path
    scale = choose_scale(weight, float8_dtype=param.qdata.dtype, block_size=list(param.block_size))
    param.qdata.copy_(quantize(weight, scale, param.qdata.dtype))
    param.scale.copy_(scale)
    return True


def stack_key(param: torch.Tensor) -> Optional[tuple]:
    """What weights must share to be re-quantized together by ``requantize_rows``; ``None`` for one
    that cannot be: anything but an fp8 weight with one scale per row on torchao's plain-torch path.
    Reads the plain inner tensors: each attribute of the subclass itself costs a ``__torch_function__``."""
    path = _float8_torch_path()
    if path is None or not isinstance(param, path[0]):
        return None
    record, qdata, block = record_of(param), param.qdata, param.block_size
    if record is None or qdata.dim() != 2 or block is None or list(block) != [1, qdata.shape[1]]:
        return None
    return qdata.device, record.dtype, qdata.dtype, qdata.shape[1]


@torch.no_grad()
def requantize_rows(params: list[torch.Tensor], rows: torch.Tensor) -> None:
    """Quantize ``rows``, the new high-precision values of ``params`` one under another, into them.

    The ``params`` share a ``stack_key``. With one scale per row each row is quantized on its own, so
    one scale and one cast over all of them give each weight the bits ``requantize`` would give it,
    in a handful of kernels instead of about ten per weight: a LoRA switch on SDXL re-quantizes ~500.
    """
    _, choose_scale, quantize = _float8_torch_path()
    first = params[0]
    high = rows.to(record_of(first).dtype)
    scale = choose_scale(high, float8_dtype=first.qdata.dtype, block_size=[1, high.shape[1]])
    quantized = quantize(high, scale, first.qdata.dtype)
    sizes = [param.qdata.shape[0] for param in params]
    torch._foreach_copy_([param.qdata for param in params], list(quantized.split(sizes)))
    torch._foreach_copy_([param.scale for param in params], list(scale.split(sizes)))


@torch.no_grad()
def requantize(param: torch.Tensor, weight: torch.Tensor) -> None:
    """Quantize ``weight`` (high precision) as ``param`` was, into ``param``'s own inner tensors."""
    record = record_of(param)
    if record is None:
        raise ValueError("requantize: this weight was not quantized by onediffx.quantize_pipe")
    weight = weight.to(param.device, record.dtype)
    if _requantize_float8(param, weight):
        return
    fresh = quantize_tensor(record.config, weight)
    for dst, src in zip(inner_tensors(param), inner_tensors(fresh), strict=True):
        dst.copy_(src)


def snapshot(param: torch.Tensor, device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """Copies of ``param``'s quantized inner tensors (on ``device``, default their own)."""
    return [t.detach().to(device or t.device, copy=True) for t in inner_tensors(param)]


@torch.no_grad()
def restore(param: torch.Tensor, saved: list[torch.Tensor]) -> None:
    """Put a ``snapshot`` back, bit for bit, into the same inner tensors."""
    for dst, src in zip(inner_tensors(param), saved, strict=True):
        dst.copy_(src, non_blocking=True)
