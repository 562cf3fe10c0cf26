"""Where one LoRA switch goes on SDXL, unquantized and fp8.

    python benchmarks/scripts/lora_switch_profile.py fp8 out.json                 # keep_originals=cpu (default)
    python benchmarks/scripts/lora_switch_profile.py fp8 out.json --keep device
    python benchmarks/scripts/lora_switch_profile.py off out.json
    python benchmarks/scripts/lora_switch_profile.py int8 out.json --tiny         # a CPU smoke run

The bench's ``quantize`` rows time a switch between two loaded LoRAs (``set_and_fuse_adapters``):
66 ms unquantized, 537 ms with fp8 on an H200 before the switch was reworked (2026-12-03). This builds the same pipeline (the
synthetic full-size SDXL in bfloat16 on the GPU, no compile: a switch writes weights in place and
costs the same with or without a graph), the bench's two LoRAs, and times ``SWITCHES`` switches;
then it profiles one switch twice: ``cProfile`` for the Python functions the time is spent in
(the device is synchronized inside the profiled call, so waiting for kernels shows up where it
happens) and ``torch.profiler`` for kernel and copy time on the device.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from onediffx.bench.lora import _generate
from onediffx.bench.quantize import LORA_MB
from onediffx.lora import load_lora_and_optionally_fuse, set_and_fuse_adapters
from onediffx.models.synthetic import build_synthetic
from onediffx.models.tiny import build_tiny
from onediffx.quantize import QuantizeConfig, quantize_pipe

SWITCHES = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_time(prof: profile) -> dict:
    """Milliseconds on the device per kind of work: copies by direction, kernels by name (top 15)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name[:100]]
            entry[0] += event.device_time_total / 1000.0
            entry[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {"device_ms": round(sum(v[0] for _, v in rows), 2),
            "top": [{"name": n, "ms": round(v[0], 2), "count": v[1]} for n, v in rows[:15]]}


def _same_bits_on_one_stream(pipe, names: list, switch) -> bool:
    """Whether a switch whose originals are copied on a side stream gives the bits the same switch
    gives with copies and math on one stream (no overlap, nothing to race)."""
    from onediffx.lora import fuse
    from onediffx.quantized_weights import inner_tensors

    def weights() -> list:
        return [t.clone() for p in pipe.unet.parameters() for t in (inner_tensors(p) or [p])]

    switch(0)
    overlapped = weights()
    side = fuse._copy_stream
    fuse._copy_stream = lambda device: torch.cuda.current_stream(device)
    try:
        switch(1)
        switch(0)
    finally:
        fuse._copy_stream = side
    def bits(t: torch.Tensor) -> torch.Tensor:  # fp8 has no equality kernel
        return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t

    return all(torch.equal(bits(a), bits(b)) for a, b in zip(overlapped, weights()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["off", "fp8", "int8", "fp8_weight_only"])
    parser.add_argument("out")
    parser.add_argument("--keep", default="cpu", choices=["cpu", "device"])
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL on the CPU (a smoke run)")
    args = parser.parse_args()

    if args.tiny:
        pipe, device = build_tiny("tiny_xl"), torch.device("cpu")
    else:
        device = torch.device("cuda")
        pipe = build_synthetic("sdxl", device, torch.bfloat16)
    files = [path for path, _ in _generate(pipe, LORA_MB if not args.tiny else [0.05, 0.06],
                                           Path(tempfile.mkdtemp(prefix="onediffx-switch-")))]
    if args.mode != "off":
        quantize_pipe(pipe, options=QuantizeConfig(mode=args.mode, keep_originals=args.keep))
    names = [f"l{i}" for i in range(len(files))]
    for name, path in zip(names, files):
        load_lora_and_optionally_fuse(pipe, str(path), name, fuse=False, offload_device="cuda")

    def switch(i: int) -> None:
        set_and_fuse_adapters(pipe, [names[i % len(names)]], [1.0])
        _sync(device)

    times = []
    for i in range(SWITCHES + 1):
        start = time.perf_counter()
        switch(i)
        times.append(time.perf_counter() - start)
    profiler = cProfile.Profile()
    profiler.runcall(switch, SWITCHES + 1)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(20)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        switch(SWITCHES + 2)
    same_bits = _same_bits_on_one_stream(pipe, names, switch) if device.type == "cuda" else None
    result = {"mode": args.mode, "side_stream_bits_equal_one_stream": same_bits, "keep_originals": args.keep, "device": str(device),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__,
              "switch_ms_median": round(statistics.median(times[1:]) * 1000, 1),
              "switch_ms_all": [round(t * 1000, 1) for t in times],
              "memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
              **(_device_time(prof) if device.type == "cuda" else {}),
              "cpu_ops": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).with_suffix(".cprofile.txt").write_text(text.getvalue())
    print("switch profile:", json.dumps({k: result[k] for k in ("mode", "keep_originals", "switch_ms_median", "side_stream_bits_equal_one_stream",
                                                                 "memory_gib", "device_ms") if k in result}), flush=True)


if __name__ == "__main__":
    main()
