"""Where one compiled SDXL call spends its time, phase by phase.

    python benchmarks/scripts/e2e_profile.py out.json                                  # model=sdxl synthetic, compile=inductor
    python benchmarks/scripts/e2e_profile.py out.json --cudnn-benchmark                # cuDNN times its conv engines
    python benchmarks/scripts/e2e_profile.py out.json compile.inductor.triton.enable_pdl=true   # any run.yaml override
    python benchmarks/scripts/e2e_profile.py out.json --tiny model=tiny_sdxl           # a CPU smoke run

A compiled SDXL image takes longer than its 30 UNet steps timed in isolation (on an H200, 2026-12-03:
1.005 s against 30 x 31.0 ms): about 75 ms is spent elsewhere. This assembles the pipeline the way
``onediffx run`` does (Hydra composition, the resolver's stages), times ``CALLS`` calls, then marks
each phase of one more call with CUDA events recorded on the stream: prompt encoding, each UNet call,
each scheduler step, the VAE decode and the PIL conversion. An event pair measures the device time
between the two points, idle time included, so the phases plus ``glue`` (what runs between them)
add up to the call. A host column says how long Python took to issue each phase: a phase whose host
time exceeds its device time keeps the GPU waiting. ``cProfile`` of a final call names the host
functions, and a Chrome trace of it is written beside the JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import pstats
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

from onediffx.config import register_configs
from onediffx.generate import Settings, generate
from onediffx.resolver import assemble
from onediffx.resources import conf_dir

CALLS = 5


class Phases:
    """Event pairs per phase name, on the current stream, and the host time spent issuing each."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any, Any, float]] = []
        self.active = False

    def _event(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wrap(self, name: str, fn: Callable) -> Callable:
        def marked(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(*args, **kwargs)
            start, host = self._event(), time.perf_counter()
            out = fn(*args, **kwargs)
            self.marks.append((name, start, self._event(), time.perf_counter() - host))
            return out
        return marked

    def hook(self, name: str, module: torch.nn.Module) -> None:
        open_marks: list[tuple[Any, float]] = []

        def before(*_: Any) -> None:
            if self.active:
                open_marks.append((self._event(), time.perf_counter()))

        def after(*_: Any) -> None:
            if self.active and open_marks:
                start, host = open_marks.pop()
                self.marks.append((name, start, self._event(), time.perf_counter() - host))

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def summary(self, call_start: Any, call_end: Any) -> dict[str, Any]:
        torch.cuda.synchronize()
        rows: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
        for name, start, end, host in self.marks:
            rows[name][0] += start.elapsed_time(end)
            rows[name][1] += host * 1000
            rows[name][2] += 1
        total = call_start.elapsed_time(call_end)
        phases = {n: {"device_ms": round(d, 2), "host_ms": round(h, 2), "calls": c} for n, (d, h, c) in rows.items()}
        phases["glue"] = {"device_ms": round(total - sum(v[0] for v in rows.values()), 2)}
        first = self.marks[0][1]
        return {"call_ms": round(total, 2), "before_first_phase_ms": round(call_start.elapsed_time(first), 2),
                "phases": phases}


def _compose(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("run", overrides=overrides)


def _host_profile(call: Callable[[], Any]) -> list[str]:
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return [line for line in out.getvalue().splitlines() if line.strip()][-27:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="no synthetic full-size model (CPU smoke run)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    base = [] if args.tiny else ["model=sdxl", "model.synthetic=true", "compile=inductor"]
    cfg = _compose([*base, "cache.enabled=false", *args.overrides])
    asm = assemble(cfg)
    settings = Settings.from_config(cfg)
    start = time.perf_counter()
    generate(asm, settings)
    first_s = time.perf_counter() - start
    for _ in range(2):
        generate(asm, settings)
    e2e = statistics.median(generate(asm, settings).seconds for _ in range(CALLS))

    pipe, phases = asm.pipe, Phases(asm.device)
    pipe.encode_prompt = phases.wrap("encode_prompt", pipe.encode_prompt)
    pipe.vae.decode = phases.wrap("vae_decode", pipe.vae.decode)
    pipe.scheduler.step = phases.wrap("scheduler_step", pipe.scheduler.step)
    pipe.image_processor.postprocess = phases.wrap("postprocess", pipe.image_processor.postprocess)
    phases.hook("unet", pipe.unet)
    phases.active = True
    call = [phases._event()]
    marked_s = generate(asm, settings).seconds
    call.append(phases._event())
    result: dict[str, Any] = {"overrides": args.overrides, "cudnn_benchmark": args.cudnn_benchmark,
                              "device": torch.cuda.get_device_name() if phases.cuda else "cpu",
                              "torch": torch.__version__, "first_call_s": round(first_s, 2),
                              "e2e_median_s": round(e2e, 4), "marked_call_s": round(marked_s, 4)}
    if phases.cuda:
        result.update(phases.summary(*call))
        unet = result["phases"]["unet"]
        result["unet_ms_each"] = round(unet["device_ms"] / unet["calls"], 2)
    phases.active = False
    result["host_top"] = _host_profile(lambda: generate(asm, settings))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if phases.cuda else [])
    with profile(activities=activities) as prof:
        generate(asm, settings)
    trace = Path(args.out).with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as raw, gzip.open(str(trace) + ".gz", "wb") as packed:
        packed.write(raw.read())
    trace.unlink()
    Path(args.out).write_text(json.dumps(result, indent=1))
    shown = {k: v for k, v in result.items() if k != "host_top"}
    print("e2e profile:", json.dumps(shown), flush=True)


if __name__ == "__main__":
    main()
