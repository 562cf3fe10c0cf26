"""8-bit self-attention: the ``onediffx::sdpa_8bit`` op and the attention processor that calls it.

SDXL's 4096-token self-attentions (64² latents at 1024²) are, with the 3x3 convolutions, the part of
a UNet step that torchao's 8-bit matmuls do not reach. cuDNN has a fused fp8 (e4m3) attention for
Hopper (``sdpa_fp8`` in ``nvidia-cudnn-frontend``): Q·Kᵀ and P·V in fp8 with fp32 accumulation, the
softmax in fp32, its probabilities quantized to fp8 with a fixed scale (they lie in [0, 1]). This
module calls it as a ``torch.library`` custom op with a fake implementation (so Dynamo traces it
whole, the graph cache saves it and CUDA graphs replay it); off CUDA the op computes the same
arithmetic in float32, a reference for tests.

Q, K and V get one scale each per call (their absolute maximum over 448): a reduction that costs
microseconds beside an attention over 4096 tokens, and no calibration to go stale when a LoRA
changes the projections. ``Attention8`` replaces the processor of self-attentions only; cross-
attention (77 text tokens) and masked calls go to the processor it replaced.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .cudnn_graphs import build, execute, handle_on_current_stream, planned

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PROBABILITY_SCALE = FP8_MAX
"""Softmax probabilities are at most 1: scaled by 448 they use e4m3's whole range."""


@torch.library.custom_op("onediffx::sdpa_8bit", mutates_args=())
def sdpa_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
              descale_v: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``softmax(q·kᵀ · scale) · v`` over fp8 ``q``, ``k``, ``v`` of shape (batch, heads, tokens, head
    dim), each dequantized by its ``descale_*`` (float32, one element); output in ``out_dtype``."""
    if q.is_cuda:
        return _cudnn(q, k, v, descale_q, descale_k, descale_v, scale, out_dtype)
    return reference(q, k, v, descale_q, descale_k, descale_v, scale, out_dtype)


@sdpa_8bit.register_fake
def _(q, k, v, descale_q, descale_k, descale_v, scale, out_dtype):  # noqa: ANN001 - typed by the op's schema
    return torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=out_dtype, device=q.device)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
              descale_v: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """cuDNN's fp8 attention in float32: scores dequantized and scaled, softmax, probabilities quantized
    to fp8 at ``PROBABILITY_SCALE``, then P·V dequantized."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * (descale_q * descale_k * scale)
    probabilities = torch.softmax(scores, dim=-1)
    p8 = (probabilities * PROBABILITY_SCALE).to(FP8)
    out = (p8.float() @ v.float()) * (descale_v / PROBABILITY_SCALE)
    return out.to(out_dtype).contiguous()


def _plan(cudnn: Any, handle: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scalars: dict[str, torch.Tensor],
          out: torch.Tensor, scale: float) -> tuple[Any, dict[str, Any], int]:
    """Fused fp8 attention (cuDNN's ``sdpa_fp8``) with a 16-bit output: one cuDNN graph."""
    graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    nodes = {"q": graph.tensor_like(q), "k": graph.tensor_like(k), "v": graph.tensor_like(v)}
    nodes.update({name: graph.tensor_like(t) for name, t in scalars.items()})
    O, _stats, amax_s, amax_o = graph.sdpa_fp8(
        q=nodes["q"], k=nodes["k"], v=nodes["v"], descale_q=nodes["descale_q"], descale_k=nodes["descale_k"],
        descale_v=nodes["descale_v"], descale_s=nodes["descale_s"], scale_s=nodes["scale_s"],
        scale_o=nodes["scale_o"], attn_scale=scale, use_causal_mask=False, generate_stats=False)
    O.set_output(True).set_data_type(cudnn.data_type.BFLOAT16 if out.dtype == torch.bfloat16 else cudnn.data_type.HALF)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
    nodes.update(o=O, amax_s=amax_s, amax_o=amax_o)
    return graph, nodes, build(cudnn, graph)


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
           descale_v: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    cudnn, handle = handle_on_current_stream(q.device)
    one = lambda t: t.float().reshape(1, 1, 1, 1).contiguous()  # noqa: E731 - cuDNN takes rank-4 scalars
    scalars = {"descale_q": one(descale_q), "descale_k": one(descale_k), "descale_v": one(descale_v),
               "descale_s": one(torch.full((), 1.0 / PROBABILITY_SCALE, device=q.device)),
               "scale_s": one(torch.full((), PROBABILITY_SCALE, device=q.device)),
               "scale_o": one(torch.ones((), device=q.device))}
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=out_dtype, device=q.device)
    amax = {"amax_s": torch.empty(1, 1, 1, 1, device=q.device), "amax_o": torch.empty(1, 1, 1, 1, device=q.device)}
    key = ("sdpa8", q.device.index, tuple(q.shape), tuple(k.shape), tuple(q.stride()), tuple(k.stride()),
           out.dtype, scale)
    graph, nodes, workspace_size = planned(key, lambda: _plan(cudnn, handle, q, k, v, scalars, out, scale))
    pack = {nodes["q"]: q, nodes["k"]: k, nodes["v"]: v, nodes["o"]: out,
            **{nodes[name]: t for name, t in scalars.items()}, **{nodes[name]: t for name, t in amax.items()}}
    execute(graph, pack, workspace_size, handle, q.device)
    return out


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in fp8 with one scale (its absolute maximum maps to 448), and that scale (float32)."""
    scale = x.detach().abs().amax().float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Attention8:
    """A diffusers attention processor: self-attention through ``sdpa_8bit``, anything else through
    the processor it replaced (kept as ``inner``, which ``remove`` puts back)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or args or kwargs:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t.contiguous()) for t in (query, key, value))
        out = torch.ops.onediffx.sdpa_8bit(q8, k8, v8, sq, sk, sv, head_dim ** -0.5, query.dtype)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if four_d:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def self_attentions(component: nn.Module) -> dict[str, nn.Module]:
    """The component's diffusers ``Attention`` modules that attend to their own input (``attn1``),
    by path: the ones ``quantize.attention`` gives ``Attention8``."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    return {path: module for path, module in component.named_modules()
            if isinstance(module, Attention) and not module.is_cross_attention
            and isinstance(module.processor, (AttnProcessor2_0, FusedAttnProcessor2_0))
            and not getattr(module, "is_joint_attention", False)}


def apply_attention8(component: nn.Module) -> list[str]:
    """Give every self-attention of ``component`` ``Attention8``; return their paths."""
    found = self_attentions(component)
    for module in found.values():
        module.set_processor(Attention8(module.processor))
    return sorted(found)


def kernels_available(device: torch.device) -> Optional[str]:
    """Why this device has no fp8 attention kernel (``None``: it has one, or runs the reference)."""
    if device.type != "cuda":
        return None
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "cuDNN's fp8 attention needs a Hopper GPU (compute capability 9.0) or newer"
    try:
        import cudnn  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken install is as unusable as a missing one
        return f"the cuDNN frontend is not importable ({type(err).__name__}: {err}); pip install 'onediffx[cudnn]'"
    return None
