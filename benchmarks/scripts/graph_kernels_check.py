"""What SDXL's attention and biased GEMMs cost inside a CUDA graph, the memsets around them included.

    python benchmarks/scripts/graph_kernels_check.py out.json

A trace of one compiled 30-step SDXL call on an H200 (``e2e_profile.py``, 2026-12-03)
showed 237 memsets per UNet step, each followed by a gap of 3 to 4 µs before the next kernel: one
before every cuDNN attention call (140 a step) and one before each of the 70 feed-forward input
GEMMs that cuBLAS runs with a bias epilogue. Timed alone (``sdpa_check.py``), a kernel's launch
overhead hides that cost. Here each case is captured ``REPEAT`` times into one graph, the graph
replayed, and the time per call reported with the memsets the profiler saw per call.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from onediffx.graph_timing import capture, replay_ms
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

REPEAT = 20
ATTENTION = {"self 4096x10": (2, 10, 4096, 4096, 64), "self 1024x20": (2, 20, 1024, 1024, 64),
             "cross 4096x10->77": (2, 10, 4096, 77, 64), "cross 1024x20->77": (2, 20, 1024, 77, 64),
             "vae 16384x1 d512": (1, 1, 16384, 16384, 512)}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
GEMMS = {"ff in 8192x640->5120": (8192, 640, 5120), "ff in 2048x1280->10240": (2048, 1280, 10240),
         "ff out 8192x2560->640": (8192, 2560, 640), "ff out 2048x5120->1280": (2048, 5120, 1280)}


def in_graph(fn: Callable[[], object]) -> dict:
    """Microseconds per call with ``REPEAT`` calls in one graph, and the memsets per call."""
    graph = capture(fn, REPEAT)
    for _ in range(3):
        graph.replay()
    times = [ms * 1000 for ms in replay_ms(graph, REPEAT, 15)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = sorted({n[:70] for n in names if "Memset" not in n})
    return {"us": round(statistics.median(times), 2),
            "memsets_per_call": round(sum("Memset" in n for n in names) / REPEAT, 2), "kernels": kernels[:3]}


def attention_rows(gen: torch.Generator) -> dict:
    rows = {}
    for label, (b, h, sq, sk, d) in ATTENTION.items():
        dtype = torch.bfloat16 if d > 128 else torch.float16
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
        k = torch.randn(b, sk, h, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
        v = torch.randn(b, sk, h, d, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
        row = {}
        for name, backend in BACKENDS.items():
            if name == "math" and d <= 128:
                continue
            try:
                with sdpa_kernel([backend]):
                    row[name] = in_graph(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError as err:
                row[name] = f"unsupported: {str(err).splitlines()[0][:80]}"
        rows[label] = row
    return rows


def gemm_rows(gen: torch.Generator) -> dict:
    rows = {}
    for label, (m, k, n) in GEMMS.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16, generator=gen) / k ** 0.5
        bias = torch.randn(n, device="cuda", dtype=torch.float16, generator=gen)
        rows[label] = {"addmm (bias epilogue)": in_graph(lambda: F.linear(x, w, bias)),
                       "mm": in_graph(lambda: F.linear(x, w))}
    return rows


def main(out: str) -> None:
    gen = torch.Generator("cuda").manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "repeat_per_graph": REPEAT,
              "attention": attention_rows(gen), "gemm": gemm_rows(gen)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for group in ("attention", "gemm"):
        for label, row in result[group].items():
            shown = {k: (v if isinstance(v, str) else (v["us"], v["memsets_per_call"])) for k, v in row.items()}
            print("graph kernels:", label, json.dumps(shown), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
