"""Which of SDXL's kernels are faster in 8 bits on this card, each timed inside a CUDA graph.

The quantize stage should put a layer in 8 bits only where that is faster: this measures, at
SDXL's own shapes (1024², batch 2 under classifier-free guidance), the 16-bit kernel against its
8-bit candidates:

* 3x3 convolutions: cuDNN bf16 (what PyTorch runs) against onediffx's ``conv2d_8bit`` op (cuDNN's
  fp8 and int8 convolutions through the graph API, ``nvidia-cudnn-frontend``, the dequantizing
  scale and bias fused as its epilogue), the op ``quantize.convs`` puts in the UNet;
* linear layers: cuBLAS bf16 against ``torch._scaled_mm`` fp8 with a per-tensor (static,
  calibrated) scale and with row-wise scales, and ``torch._int_mm`` int8; plus the cost of
  casting the activation when nothing fuses the cast into its producer;
* attention: PyTorch SDPA bf16 (cuDNN and flash backends) against onediffx's ``sdpa_8bit`` op
  (cuDNN's fused fp8 attention), the op ``quantize.attention`` puts in the self-attentions.

Each kernel is replayed from a CUDA graph, as the compiled pipeline runs it, so host overhead of
the Python launchers does not count. Prints one table and writes JSON to the path given.

    python benchmarks/scripts/fp8_kernels_check.py out.json
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Callable

import torch
import torch.nn.functional as F
from onediffx.graph_timing import capture, replay_ms

DEV = "cuda"
FP8 = torch.float8_e4m3fn
# (latent side, in channels, out channels, how many such 3x3 convs one SDXL UNet step runs)
CONVS = [(128, 320, 320, 7), (128, 640, 320, 2), (128, 960, 320, 1), (128, 640, 640, 1),
         (64, 320, 640, 1), (64, 640, 640, 6), (64, 960, 640, 1), (64, 1280, 640, 1), (64, 1920, 640, 1),
         (64, 1280, 1280, 1), (32, 640, 1280, 1), (32, 1280, 1280, 10), (32, 1920, 1280, 1), (32, 2560, 1280, 2)]
# (tokens M, in K, out N, count per step): the transformer blocks at 64² (10) and 32² (60)
GEMMS = [(8192, 640, 1920, 10), (8192, 640, 640, 20), (8192, 640, 5120, 10), (8192, 2560, 640, 10),
         (2048, 1280, 3840, 60), (2048, 1280, 1280, 120), (2048, 1280, 10240, 60), (2048, 5120, 1280, 60)]
# (batch, heads, tokens, head dim, count per step): self-attention at 64² and 32²
ATTN = [(2, 10, 4096, 64, 10), (2, 20, 1024, 64, 60)]


def graph_ms(fn: Callable[[], None], iters: int = 20, reps: int = 5) -> float:
    """Median milliseconds of one ``fn`` replayed from a CUDA graph of ``iters`` calls."""
    times = sorted(replay_ms(capture(fn, iters), iters, reps))
    return times[len(times) // 2]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-30)))


def _fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fp8 and its scale (amax maps to e4m3's 448)."""
    scale = t.abs().amax().float().clamp_min(1e-12) / 448.0
    return (t.float() / scale).to(FP8), scale


def check_convs() -> list[dict]:
    """bf16 ``F.conv2d`` against onediffx's ``conv2d_8bit`` op (what ``quantize.convs`` runs), fp8 and int8,
    with the input quantized by the op's own ``quantize_input`` (fused upstream in a compiled graph, so
    timed separately as ``*_cast_ms``)."""
    from onediffx.quantize.conv8 import FP8 as FP8_TYPE, Conv8, quantize_input

    rows = []
    for side, cin, cout, count in CONVS:
        row = {"kind": "conv3x3", "shape": f"{side}x{side} {cin}->{cout}", "count": count}
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(DEV, torch.bfloat16).to(memory_format=torch.channels_last)
        x = torch.randn(2, cin, side, side, device=DEV, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = conv(x)
            row["bf16_ms"] = graph_ms(lambda: conv(x))
            for tag, dtype in (("fp8", FP8_TYPE), ("int8", torch.int8)):
                try:
                    layer = Conv8(conv, float(x.abs().amax()) / (448.0 if dtype == FP8_TYPE else 127.0), dtype)
                    q = quantize_input(x, layer.input_inv_scale, dtype)
                    op = lambda: torch.ops.onediffx.conv2d_8bit(q, layer.weight, layer.descale, layer.bias,  # noqa: E731
                                                                layer.stride, layer.padding, layer.dilation, x.dtype)
                    out = op()
                    torch.cuda.synchronize()
                    row[f"{tag}_cudnn_ms"] = graph_ms(op)
                    row[f"{tag}_cast_ms"] = graph_ms(lambda: quantize_input(x, layer.input_inv_scale, dtype))
                    row[f"{tag}_sqnr_db"] = round(sqnr_db(ref, out), 1)
                except Exception as err:  # the table says which candidates the card or library lacks
                    row[f"{tag}_cudnn_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    if not rows:
                        traceback.print_exc()
        rows.append(row)
    return rows


def check_gemms() -> list[dict]:
    rows = []
    for m, k, n, count in GEMMS:
        row = {"kind": "linear", "shape": f"{m}x{k}->{n}", "count": count}
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k ** 0.5
        ref = x @ w.t()
        row["bf16_ms"] = graph_ms(lambda: torch.mm(x, w.t()))
        x8, sx = _fp8(x)
        w8, sw = _fp8(w)
        w8t = w8.t()  # column-major, as _scaled_mm wants its second operand
        try:
            row["fp8_tensor_ms"] = graph_ms(lambda: torch._scaled_mm(x8, w8t, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16))
            out = torch._scaled_mm(x8, w8t, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
            row["fp8_sqnr_db"] = round(sqnr_db(ref, out), 1)
            inv = 1.0 / sx
            row["cast_ms"] = graph_ms(lambda: (x * inv).to(FP8))
            row_scale_x = x.abs().amax(dim=1, keepdim=True).float() / 448.0
            xr = (x.float() / row_scale_x).to(FP8)
            row_scale_w = (w.abs().amax(dim=1, keepdim=True).float() / 448.0).t().contiguous()
            wr = (w.float() / row_scale_w.t()).to(FP8).t()
            row["fp8_row_ms"] = graph_ms(lambda: torch._scaled_mm(xr, wr, scale_a=row_scale_x, scale_b=row_scale_w, out_dtype=torch.bfloat16))
        except Exception as err:
            row["fp8_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        try:
            xi = torch.randint(-127, 127, (m, k), device=DEV, dtype=torch.int8)
            wi = torch.randint(-127, 127, (n, k), device=DEV, dtype=torch.int8).t()
            row["int8_ms"] = graph_ms(lambda: torch._int_mm(xi, wi))
        except Exception as err:
            row["int8_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows.append(row)
    return rows


def check_attention() -> list[dict]:
    """PyTorch SDPA bf16 (cuDNN and flash backends) against onediffx's ``sdpa_8bit`` op (cuDNN's fused
    fp8 attention, what ``quantize.attention`` runs), with its per-tensor Q/K/V casts timed apart."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from onediffx.quantize.attention8 import quantize_per_tensor

    rows = []
    for b, h, s, d, count in ATTN:
        row = {"kind": "attention", "shape": f"{b}x{h}x{s}x{d}", "count": count}
        q, k, v = (torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    row[f"bf16_{name}_ms"] = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            except Exception as err:
                row[f"bf16_{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
        try:
            (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
            op = lambda: torch.ops.onediffx.sdpa_8bit(q8, k8, v8, sq, sk, sv, d ** -0.5, torch.bfloat16)  # noqa: E731
            out = op()
            torch.cuda.synchronize()
            row["fp8_cudnn_ms"] = graph_ms(op)
            row["fp8_cast_ms"] = graph_ms(lambda: [quantize_per_tensor(t) for t in (q, k, v)])
            row["fp8_sqnr_db"] = round(sqnr_db(ref, out), 1)
        except Exception as err:
            row["fp8_cudnn_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            traceback.print_exc()
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    """Per-step milliseconds of each kind, 16-bit against the best 8-bit candidate per shape."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        base = row.get("bf16_ms") or min(v for k, v in row.items() if k.startswith("bf16_") and k.endswith("_ms"))
        eight = [v for k, v in row.items() if k.endswith("_ms") and not k.startswith("bf16") and not k.endswith("cast_ms")]
        best = min([base, *eight])
        agg = out.setdefault(row["kind"], {"bf16_ms_per_step": 0.0, "best_ms_per_step": 0.0})
        agg["bf16_ms_per_step"] += base * row["count"]
        agg["best_ms_per_step"] += best * row["count"]
    return {k: {n: round(v, 2) for n, v in d.items()} for k, d in out.items()}


def main(path: str) -> int:
    torch.backends.cudnn.benchmark = True
    rows: list[dict] = []
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    try:
        import cudnn

        header["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
        header["cudnn_backend"] = cudnn.backend_version()
    except Exception as err:
        header["cudnn_frontend"] = f"unavailable: {err}"
    for check in (check_gemms, check_convs, check_attention):
        try:
            rows += check()
        except Exception:
            traceback.print_exc()
    result = {**header, "rows": rows, "per_step": summary(rows)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(header))
    for row in rows:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(json.dumps(result["per_step"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "fp8_kernels.json"))
