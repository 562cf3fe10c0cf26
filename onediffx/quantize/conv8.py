"""8-bit 3x3 convolutions with calibrated scales: the ``onediffx::conv2d_8bit`` op and ``Conv8``.

With its attention, SDXL's UNet spends about 11 of 29 ms of kernels per step in 3x3 convolutions,
and neither PyTorch nor torchao has an 8-bit convolution on Hopper. cuDNN has one (fp8 e4m3 and
int8, NHWC, through its graph API: ``nvidia-cudnn-frontend``); this module calls it as a
``torch.library`` custom op with a fake implementation, so Dynamo traces it with ``fullgraph=True``,
Inductor calls it from the compiled graph, the graph cache saves that graph, and CUDA graphs replay
it. Elsewhere (the CPU) the op computes the same arithmetic in float32: a reference for tests, not a
fast path.

``Conv8`` replaces an ``nn.Conv2d``: its weight is quantized once per output channel, its input
with one static scale from calibration (``quantize.calibrate``). Quantizing the input is plain
PyTorch arithmetic in front of the op, so Inductor fuses it into the kernel that produces the input
(the GroupNorm and SiLU before each ResNet convolution), and the op's dequantizing scale and bias
run inside cuDNN's graph as its epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cudnn_graphs import build, execute, handle_on_current_stream, planned

FP8 = torch.float8_e4m3fn
QMAX = {FP8: 448.0, torch.int8: 127.0}
"""The largest magnitude of each 8-bit type: a calibrated range or a channel's weight maximum maps onto it."""
CHANNEL_ALIGN = {FP8: 16, torch.int8: 4}
"""cuDNN's 8-bit convolutions need input and output channels in these multiples (NHWC vector widths)."""


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _empty_out(x: torch.Tensor, weight: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int],
               out_dtype: torch.dtype) -> torch.Tensor:
    """The op's output: NHWC (channels-last), as cuDNN writes it, on every device."""
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    shape = (n, k, _out_size(h, r, stride[0], padding[0], dilation[0]), _out_size(w, s, stride[1], padding[1], dilation[1]))
    return torch.empty(shape, dtype=out_dtype, device=x.device).to(memory_format=torch.channels_last)


@torch.library.custom_op("onediffx::conv2d_8bit", mutates_args=())
def conv2d_8bit(x: torch.Tensor, weight: torch.Tensor, descale: torch.Tensor, bias: Optional[torch.Tensor],
                stride: List[int], padding: List[int], dilation: List[int], out_dtype: torch.dtype) -> torch.Tensor:
    """``conv2d(x, weight) * descale[k] + bias[k]`` over 8-bit ``x`` and ``weight`` (both fp8 e4m3 or
    both int8), accumulated in 32 bits; ``descale`` (float32, one per output channel) is the product
    of the input's and the weights' scales. Output in ``out_dtype``, channels-last."""
    if x.is_cuda:
        return _cudnn(x, weight, descale, bias, stride, padding, dilation, out_dtype)
    return reference(x, weight, descale, bias, stride, padding, dilation, out_dtype)


@conv2d_8bit.register_fake
def _(x, weight, descale, bias, stride, padding, dilation, out_dtype):  # noqa: ANN001 - the op's schema types them
    return _empty_out(x, weight, stride, padding, dilation, out_dtype)


def reference(x: torch.Tensor, weight: torch.Tensor, descale: torch.Tensor, bias: Optional[torch.Tensor],
              stride: List[int], padding: List[int], dilation: List[int], out_dtype: torch.dtype) -> torch.Tensor:
    """The op's arithmetic in float32 (8-bit values are exact in it; sums are rounded as float32 sums)."""
    y = F.conv2d(x.float(), weight.float(), None, stride, padding, dilation) * descale.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    out = _empty_out(x, weight, stride, padding, dilation, out_dtype)
    return out.copy_(y)


def _cudnn_type(cudnn: Any, dtype: torch.dtype) -> Any:
    return {FP8: cudnn.data_type.FP8_E4M3, torch.int8: cudnn.data_type.INT8, torch.bfloat16: cudnn.data_type.BFLOAT16,
            torch.float16: cudnn.data_type.HALF, torch.float32: cudnn.data_type.FLOAT}[dtype]


def _plan(cudnn: Any, handle: Any, x: torch.Tensor, weight: torch.Tensor, descale: torch.Tensor,
          bias: Optional[torch.Tensor], out: torch.Tensor, stride: List[int], padding: List[int],
          dilation: List[int]) -> tuple[Any, tuple, int]:
    """conv_fprop in 32-bit accumulation, times the per-channel descale, plus the bias: one cuDNN graph."""
    compute = cudnn.data_type.INT32 if x.dtype == torch.int8 else cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=_cudnn_type(cudnn, x.dtype), intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    X, W, S = graph.tensor_like(x), graph.tensor_like(weight), graph.tensor_like(descale.view(1, -1, 1, 1))
    Y = graph.conv_fprop(image=X, weight=W, padding=list(padding), stride=list(stride), dilation=list(dilation),
                         compute_data_type=compute)
    Y = graph.scale(input=Y, scale=S)
    B = None
    if bias is not None:
        B = graph.tensor_like(bias.view(1, -1, 1, 1))
        Y = graph.bias(input=Y, bias=B)
    Y.set_output(True).set_data_type(_cudnn_type(cudnn, out.dtype))
    return graph, (X, W, S, B, Y), build(cudnn, graph)


def _cudnn(x: torch.Tensor, weight: torch.Tensor, descale: torch.Tensor, bias: Optional[torch.Tensor],
           stride: List[int], padding: List[int], dilation: List[int], out_dtype: torch.dtype) -> torch.Tensor:
    cudnn, handle = handle_on_current_stream(x.device)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)
    descale = descale.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    out = _empty_out(x, weight, stride, padding, dilation, out_dtype)
    key = ("conv8", x.device.index, tuple(x.shape), tuple(weight.shape), x.dtype, bias is not None, out.dtype,
           tuple(stride), tuple(padding), tuple(dilation))
    graph, (X, W, S, B, Y), workspace_size = planned(
        key, lambda: _plan(cudnn, handle, x, weight, descale, bias, out, stride, padding, dilation))
    pack = {X: x, W: weight, S: descale.view(1, -1, 1, 1), Y: out}
    if B is not None:
        pack[B] = bias.view(1, -1, 1, 1)
    execute(graph, pack, workspace_size, handle, x.device)
    return out


def quantize_input(x: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` in ``dtype``, saturated at its range (int8 rounded): plain ops Inductor fuses upstream."""
    y = x.float() * inv_scale
    if dtype == torch.int8:
        y = y.round()
    return y.clamp(-QMAX[dtype], QMAX[dtype]).to(dtype)


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel 8-bit weights and their scales (float32, one per channel)."""
    amax = weight.detach().float().abs().amax(dim=(1, 2, 3)).clamp_min(1e-12)
    scale = amax / QMAX[dtype]
    return quantize_input(weight.detach(), (1.0 / scale).view(-1, 1, 1, 1), dtype), scale


def fits(conv: nn.Module, dtype: torch.dtype) -> Optional[str]:
    """Why ``conv`` cannot be an 8-bit convolution of ``dtype`` (``None``: it can)."""
    if type(conv) is not nn.Conv2d:
        return "not a plain Conv2d"
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return "grouped, padded by mode or by name"
    align = CHANNEL_ALIGN[dtype]
    if conv.in_channels % align or conv.out_channels % align:
        return f"8-bit convolutions need channels divisible by {align} ({conv.in_channels}->{conv.out_channels})"
    return None


@dataclass(frozen=True)
class Conv8Config:
    """How a ``Conv8`` was made, as the record LoRA fusing reads (``QuantizedWeight.config``)."""

    act_quant_scale: float
    """The calibrated input scale (static: a LoRA fused later would be clipped by it)."""
    dtype: torch.dtype


class Conv8(nn.Module):
    """An ``nn.Conv2d`` in 8 bits: per-channel weight scales, one calibrated input scale."""

    def __init__(self, conv: nn.Conv2d, input_scale: float, dtype: torch.dtype) -> None:
        super().__init__()
        reason = fits(conv, dtype)
        if reason is not None:
            raise ValueError(f"Conv8: {reason}")
        qweight, weight_scale = quantize_weight(conv.weight, dtype)
        self.weight = nn.Parameter(qweight.contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.register_buffer("descale", (weight_scale * input_scale).float())
        self.register_buffer("input_inv_scale", torch.tensor(1.0 / input_scale, dtype=torch.float32,
                                                             device=conv.weight.device))
        # Inference only: the op has no backward, so no parameter of it may ask for gradients.
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = quantize_input(x, self.input_inv_scale, self.weight.dtype)
        return torch.ops.onediffx.conv2d_8bit(q, self.weight, self.descale, self.bias, self.stride, self.padding,
                                              self.dilation, x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, {str(self.weight.dtype).replace('torch.', '')}")


def is_spatial_conv(module: nn.Module) -> bool:
    """A convolution with a kernel larger than 1x1 (the 1x1 ones are matmuls: ``quantize.conv_1x1``)."""
    return type(module) is nn.Conv2d and tuple(module.kernel_size) != (1, 1)


def kernels_available(device: torch.device) -> Optional[str]:
    """Why this device has no 8-bit convolution kernel (``None``: it has one, or runs the reference)."""
    if device.type != "cuda":
        return None
    try:
        import cudnn  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken install is as unusable as a missing one
        return f"the cuDNN frontend is not importable ({type(err).__name__}: {err}); pip install 'onediffx[cudnn]'"
    return None
