"""Each quantization mode's torchao recipe, and whether this device and dtype can run it.

torchao does the quantizing (``quantize_`` with one of its configs); this module only picks the
config and refuses, before any weight is touched, a mode the card cannot run, naming one that can.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import NotAvailableError
from .config import QuantizeMode

FP8_MIN_CAPABILITY = (8, 9)
"""fp8 matmuls (``torch._scaled_mm``): Ada and Hopper or newer."""
FP8_ALIGN = 16
"""fp8 matmuls need both dimensions of the weight to be multiples of 16."""
FP8_ACTIVATION_LB = 1e-12
"""Lower bound torchao clamps each activation row's absolute maximum to before dividing it by 448
(``activation_value_lb``, applied in ``_choose_scale_float8``). Without it an all-zero row (SDXL's
empty negative prompt is all zeros, and so is every value projected from it) gets scale 0 and is
quantized as 0/0 = NaN. A row whose maximum is above the bound gets exactly the scale it had; one
below it is zero in all but name. torchao has no such bound for weights: ``select`` leaves layers
with all-zero weight rows in high precision instead."""


def torchao_config(mode: QuantizeMode) -> Any:
    """The torchao config that implements ``mode`` (torchao imported here, quietly).

    ``set_inductor_config=False``: torchao would otherwise switch on process-wide Inductor settings
    (coordinate-descent tuning among them, which multiplies compile time) that no graph-cache key
    sees; Inductor settings belong to ``compile.inductor``. fp8 bounds the activation scales from
    below (``FP8_ACTIVATION_LB``) so all-zero rows stay zero rather than NaN; torchao then quantizes
    activations with its PyTorch ops, not MSLK's Triton kernel (which takes no lower bound), and
    Inductor fuses those ops into the matmul's prologue when compiled. int8 needs no bound: its
    scales are clamped to the dtype's eps.
    """
    quantization = import_torchao()
    mode = QuantizeMode(mode)
    if mode == QuantizeMode.fp8:
        make, kwargs = quantization.Float8DynamicActivationFloat8WeightConfig, {
            "granularity": quantization.PerRow(), "activation_value_lb": FP8_ACTIVATION_LB}
    elif mode == QuantizeMode.int8:
        make, kwargs = quantization.Int8DynamicActivationInt8WeightConfig, {}
    elif mode == QuantizeMode.fp8_weight_only:
        make, kwargs = quantization.Float8WeightOnlyConfig, {}
    elif mode == QuantizeMode.int8_weight_only:
        make, kwargs = quantization.Int8WeightOnlyConfig, {}
    else:
        raise ValueError(f"no torchao config for quantize mode {mode.value!r}")
    if "set_inductor_config" in getattr(make, "__dataclass_fields__", {}):
        kwargs["set_inductor_config"] = False
    return make(**kwargs)


def static_config(mode: QuantizeMode, scale: float, ndim: int, device: torch.device) -> Any:
    """torchao's static-activation config of one layer: one calibrated per-tensor scale for its input.

    Per-tensor for weights too: torchao's static fp8 takes no other granularity, and per-tensor
    scales on both sides are what cuBLAS's fastest fp8 path (and int8's ``_int_mm`` epilogue) take.
    The scale tensor has the input's rank, as torchao's quantizer requires.
    """
    quantization = import_torchao()
    act_scale = torch.full((1,) * ndim, scale, dtype=torch.float32, device=device)
    mode = QuantizeMode(mode)
    if mode == QuantizeMode.fp8:
        make = quantization.Float8StaticActivationFloat8WeightConfig
    elif mode == QuantizeMode.int8:
        make = quantization.Int8StaticActivationInt8WeightConfig
    else:
        raise ValueError(f"quantize mode {mode.value!r} has no static activations")
    return make(act_quant_scale=act_scale, granularity=quantization.PerTensor(), set_inductor_config=False)


DTYPE_MAX = {QuantizeMode.fp8: 448.0, QuantizeMode.int8: 127.0}
"""The largest magnitude of each mode's 8-bit type: a calibrated range maps onto it."""


def import_torchao() -> Any:
    """``torchao.quantization``, or one line saying how to install it.

    torchao logs a warning for each prebuilt kernel library that does not match this torch build
    (kernels onediffx's modes do not use); those are silenced during the import.
    """
    import logging

    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError as err:
        raise NotAvailableError(f"quantize: torchao is not installed ({err}); pip install 'onediffx[quantize]' "
                                "or pip install torchao") from None
    finally:
        logger.setLevel(level)
    return quantization


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def check_supported(mode: QuantizeMode, device: torch.device, prefix: str = "quantize") -> None:
    """Refuse a mode this device cannot run, in one line that names the mode that would work."""
    mode = QuantizeMode(mode)
    if mode != QuantizeMode.fp8:  # weight-only fp8 dequantizes to bfloat16: any device runs it, no faster
        return
    capability = _capability(device)
    if capability is not None and capability >= FP8_MIN_CAPABILITY:
        return
    where = (f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})"
             if capability else f"the {device.type.upper()}")
    raise NotAvailableError(f"{prefix}={mode.value}: fp8 matmuls need an NVIDIA GPU of compute capability >= 8.9 "
                            f"(Ada, Hopper), not {where}; use {prefix}=int8 here (or fp8_weight_only for memory)")


def needed_dtype(mode: QuantizeMode, dtype: torch.dtype) -> torch.dtype:
    """The dtype the quantized components must run in: torchao's fp8 row-wise kernels take bfloat16."""
    if QuantizeMode(mode) in (QuantizeMode.fp8, QuantizeMode.fp8_weight_only) and dtype != torch.bfloat16:
        return torch.bfloat16
    return dtype
