"""Where the compiled SDXL UNet step spends its GPU time, unquantized and fp8.

    python benchmarks/scripts/step_profile.py off out.json
    python benchmarks/scripts/step_profile.py fp8 out.json --after off.done   # profile only once off.done exists
    python benchmarks/scripts/step_profile.py off out.json epilogue_fusion=true    # extra Inductor config keys

Builds the synthetic full-size SDXL on the GPU (fp16; bf16 for fp8, which torchao's kernels take),
quantizes it when asked, compiles it with the ``inductor`` preset but without CUDA graphs (the
profiler then sees every kernel; their durations are the same inside a graph) and profiles ten UNet
calls at 1024² with classifier-free guidance (batch 2). Kernel time is grouped by what the kernel
does, read from its name: fp8 and 16-bit GEMMs, convolutions, attention, the Triton kernels that
compute activation scales (``amax``), the other Triton kernels, and the rest. ``--after`` lets
processes compiled side by side take turns on the GPU, so no profile is taken under contention.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from onediffx.compile import compile_pipe
from onediffx.compile.options import preset_options
from onediffx.models.synthetic import build_synthetic
from onediffx.quantize import quantize_pipe
from onediffx.quantize.quality import capture_first_call

ITERS = 10
# First match wins: the order matters (an amax kernel is Triton, cuDNN's attention is an fprop, an fp8 GEMM a GEMM).
GROUPS = [
    ("activation scales (Triton amax)", re.compile(r"^triton.*amax", re.I)),
    ("other Triton", re.compile(r"^triton", re.I)),  # named after the ops they fuse, "convolution" included
    ("attention", re.compile(r"attn|attention|fmha|flash|cudnn_generated_fort_native_sdpa|sdpa", re.I)),
    ("fp8 GEMM", re.compile(r"e4m3|f8f8|fp8|_f8_|float8|nvjet_sm90_qq", re.I)),  # cuBLAS: nvjet_*_qq* takes fp8
    ("convolution", re.compile(r"conv|fprop|dgrad|implicit_gemm|implicit_convolve", re.I)),
    ("16-bit GEMM", re.compile(r"gemm|xmma|cutlass|nvjet|ampere_|sm90_|s16816|h16816", re.I)),
]


def _group(name: str) -> str:
    return next((label for label, pattern in GROUPS if pattern.search(name)), "other")


def _kernels(prof: profile) -> list[dict]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name]
            entry[0] += event.device_time_total / 1000.0 / ITERS  # ms per UNet call
            entry[1] += 1
    rows = [{"kernel": name[:160], "group": _group(name), "ms_per_step": round(ms, 4), "launches_per_step": n // ITERS}
            for name, (ms, n) in totals.items()]
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["off", "fp8"])
    parser.add_argument("out")
    parser.add_argument("--after", help="wait until this file exists before profiling")
    parser.add_argument("inductor", nargs="*", help="extra Inductor config: key=value (true/false/ints)")
    args = parser.parse_intermixed_args()
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.inductor)}

    dtype = torch.bfloat16 if args.mode == "fp8" else torch.float16
    pipe = build_synthetic("sdxl", "cuda", dtype)
    pipe.set_progress_bar_config(disable=True)
    if args.mode == "fp8":
        quantize_pipe(pipe, "fp8")
    options = preset_options("inductor", cuda_graphs=False)
    options.inductor = {**options.inductor, **extra}
    compile_pipe(pipe, "inductor", options)
    start = time.perf_counter()
    with capture_first_call(pipe.unet) as captured:
        pipe("an astronaut", num_inference_steps=2, height=1024, width=1024)
    first_s = time.perf_counter() - start

    def step() -> None:
        with torch.no_grad():
            pipe.unet(*captured.args, **captured.kwargs)

    for _ in range(3):
        step()
    if args.after:
        while not Path(args.after).exists():
            time.sleep(1)
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    events[0].record()
    for _ in range(ITERS):
        step()
    events[1].record()
    torch.cuda.synchronize()
    wall_ms = events[0].elapsed_time(events[1]) / ITERS
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            step()
        torch.cuda.synchronize()
    kernels = _kernels(prof)
    groups: dict[str, float] = defaultdict(float)
    for row in kernels:
        groups[row["group"]] += row["ms_per_step"]
    result = {"mode": args.mode, "inductor_extra": extra, "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "first_call_s": round(first_s, 1),
              "step_ms_without_cuda_graphs": round(wall_ms, 2),
              "kernel_ms_per_step": round(sum(groups.values()), 2),
              "groups_ms": {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
              "top_kernels": kernels[:40]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out + ".done").write_text("")
    print("step profile:", json.dumps({k: result[k] for k in ("mode", "inductor_extra", "step_ms_without_cuda_graphs",
                                                               "kernel_ms_per_step", "groups_ms")}), flush=True)


if __name__ == "__main__":
    main()
