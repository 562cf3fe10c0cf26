"""Does a static activation scale take the fp8 quantization cost out of SDXL's feed-forward?

    python benchmarks/scripts/fp8_scales_check.py out.json

``step_profile.py`` found the fp8 UNet step slower than the 16-bit one: computing each activation row's
scale turns the producing kernel (here GEGLU) into a reduction that reads the row twice. This times the
feed-forward's second half, ``linear(gelu(gate) * hidden)``, at SDXL 1024²'s two transformer shapes with
classifier-free guidance, compiled by Inductor three ways:

* ``bf16``: the unquantized layer;
* ``fp8 dynamic``: row-wise activation scales computed per call (what torchao's fp8 mode does);
* ``fp8 static``: one activation scale calibrated beforehand, so the producer only multiplies and casts.

Both fp8 variants use row-wise weight scales and ``torch._scaled_mm``; times are per call, from CUDA-graph replays
(median of 100).
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
import torch.nn.functional as F
from onediffx.graph_timing import capture, replay_ms

FP8 = torch.float8_e4m3fn
MAX = torch.finfo(FP8).max
# (rows = batch 2 x tokens, GEGLU inner width, output width): SDXL's 64x64 and 32x32 transformer levels
SHAPES = {"64x64 level": (8192, 2560, 640), "32x32 level": (2048, 5120, 1280)}


def _time(fn, *args, iters: int = 100, per_graph: int = 20) -> float:
    """Per call, replayed from one CUDA graph of ``per_graph`` calls: each call is microseconds of GPU
    work, so timing launches from Python would measure the CPU."""
    graph = capture(lambda: fn(*args), per_graph)
    times = replay_ms(graph, per_graph, iters)
    return statistics.median(times)


def bf16(hidden, gate, weight, *_):
    return F.linear(hidden * F.gelu(gate), weight)


def fp8_dynamic(hidden, gate, _, weight_t, weight_scale, __):
    x = hidden * F.gelu(gate)
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / MAX
    q = (x.float() / scale).clamp(-MAX, MAX).to(FP8)
    return torch._scaled_mm(q, weight_t, scale_a=scale, scale_b=weight_scale, out_dtype=torch.bfloat16)


def fp8_static(hidden, gate, _, weight_t, weight_scale, act_scale):
    x = hidden * F.gelu(gate)
    q = (x.float() / act_scale).clamp(-MAX, MAX).to(FP8)
    return torch._scaled_mm(q, weight_t, scale_a=act_scale, scale_b=weight_scale, out_dtype=torch.bfloat16)


def main() -> None:
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, (rows, inner, out) in SHAPES.items():
        hidden = torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16)
        gate = torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(out, inner, device="cuda", dtype=torch.bfloat16) / inner ** 0.5
        w_scale = weight.abs().amax(dim=1, keepdim=True).float() / MAX  # (out, 1)
        weight_t = (weight.float() / w_scale).to(FP8).t()  # column-major, as _scaled_mm takes it
        x = hidden * F.gelu(gate)
        # calibrated once: the largest row maximum, as one value broadcast over the rows
        act_scale = (x.abs().amax().float() / MAX).expand(rows, 1).contiguous()
        args = (hidden, gate, weight, weight_t, w_scale.t().contiguous(), act_scale)
        reference = bf16(*args).float()
        row = {}
        for label, fn in (("bf16", bf16), ("fp8 dynamic", fp8_dynamic), ("fp8 static", fp8_static)):
            compiled = torch.compile(fn)
            error = ((compiled(*args).float() - reference).norm() / reference.norm()).item()
            row[label] = {"ms": round(_time(compiled, *args), 4), "rel_error": round(error, 4)}
        results["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
