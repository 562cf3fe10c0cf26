"""Which fused attention kernel is fastest at SDXL's attention shapes, and does the compiled path use it?

    python benchmarks/scripts/sdpa_check.py out.json

Times each SDPA backend alone (fp16, CUDA events, median of 50) at SDXL 1024²'s shapes with CFG
(batch 2): self-attention over 4096 tokens with 10 heads and over 1024 tokens with 20 heads,
cross-attention to 77 text tokens. Then checks that cuDNN's kernel replays in a CUDA graph with the
same output, and that a diffusers ``Attention`` compiled by onediffx's ``CompiledForward`` under
``compile.attention=cudnn`` launches cuDNN's kernel (kernel names from the profiler).
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"self 4096x10": (2, 10, 4096, 4096), "self 1024x20": (2, 20, 1024, 1024),
          "cross 4096x10->77": (2, 10, 4096, 77), "cross 1024x20->77": (2, 20, 1024, 77)}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _time(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(out: str) -> None:
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cudnn": torch.backends.cudnn.version(), "ms": {}}
    gen = torch.Generator("cuda").manual_seed(0)
    for label, (b, h, sq, sk) in SHAPES.items():
        q = torch.randn(b, sq, h, 64, device="cuda", dtype=torch.float16, generator=gen).transpose(1, 2)
        k = torch.randn(b, sk, h, 64, device="cuda", dtype=torch.float16, generator=gen).transpose(1, 2)
        v = torch.randn(b, sk, h, 64, device="cuda", dtype=torch.float16, generator=gen).transpose(1, 2)
        row = {}
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    row[name] = round(_time(lambda: F.scaled_dot_product_attention(q, k, v)), 4)
            except RuntimeError as err:
                row[name] = f"unsupported: {str(err).splitlines()[0][:80]}"
        result["ms"][label] = row
    # cuDNN in a CUDA graph, against flash
    q = torch.randn(2, 10, 4096, 64, device="cuda", dtype=torch.float16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref = F.scaled_dot_product_attention(q, q, q)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        F.scaled_dot_product_attention(q, q, q)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_g = F.scaled_dot_product_attention(q, q, q)
    graph.replay()
    torch.cuda.synchronize()
    result["cuda_graph_max_abs_diff_vs_flash"] = float((out_g - ref).abs().max())
    # onediffx's compiled path: which kernel each choice traced into the graph
    from onediffx.bench.measure import attention_kernels

    for choice in ("cudnn", "flash"):
        result[f"compiled_{choice}_kernels"] = sorted(n[:90] for n in attention_kernels(choice, torch.device("cuda")))
    print(json.dumps(result, indent=1))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sdpa.json")
