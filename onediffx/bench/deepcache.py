"""DeepCache benchmark: diffusers, the ``DeepCache`` package and onediffx on one pipe, in one process.

Same pipe, prompt, seed and resolution for every row, so the rows differ only in how the UNet is
run. Order matters: the uncompiled rows come first because ``compile_fn`` changes the pipe for good.
Each cached image is scored by PSNR against the uncached diffusers image at the same seed, so the
table shows what the speed costs in fidelity. As in the steady-state scenario, diffusers eager can
be measured again last on a fresh pipeline, and speed-ups are against the faster of the two: the
first measurement of a process has come out up to 25% slower, which would flatter every ratio.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..device import device_name, synchronize
from ..deep_cache import DeepCacheParams, deep_cache, disable, enable, helper_branch_id, pipeline_unet
from .measure import psnr

PROMPT = "a photo of an astronaut riding a horse on the moon"


def run_deepcache_bench(
    pipe: Any,
    device: torch.device | str,
    intervals: Sequence[int] = (2, 3, 5),
    steps: int = 30,
    height: int = 1024,
    width: int = 1024,
    compile_fn: Optional[Callable[[Any], Any]] = None,
    *,
    prompt: str = PROMPT,
    seed: int = 0,
    cache_layer_id: int = 0,
    cache_block_id: int = 0,
    repeat: int = 1,
    warmup: int = 1,
    fresh: Optional[Callable[[], Any]] = None,
) -> list[dict[str, Any]]:
    """Time every method (median of ``repeat`` calls after ``warmup``) and score its image.

    Rows: diffusers eager; ``DeepCacheSDHelper`` (eager) per interval; onediffx deepcache eager per
    interval; then, when ``compile_fn`` is given, onediffx deepcache on ``compile_fn(pipe)`` per
    interval; then, when ``fresh`` is given, diffusers eager again on the pipeline ``fresh()`` loads.
    Each row: ``method``, ``interval``, ``compiled``, ``latency_s``, ``speedup`` (over the faster
    diffusers eager row), ``psnr_db`` (against the first diffusers image), ``device``, plus ``note``
    if skipped.
    """
    device = torch.device(device)
    unet = pipeline_unet(pipe)
    # A pipe prepared by the deepcache stage caches every call by default: the baseline must not.
    stage_defaults = disable(pipe)
    helper_id = helper_branch_id(unet, cache_layer_id, cache_block_id)
    call = _caller(pipe, device, prompt, seed, steps, height, width)

    def measure(run: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
        for _ in range(warmup):
            run()
        times, image = [], None
        for _ in range(max(1, repeat)):
            synchronize(device)
            start = time.perf_counter()
            image = run()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return float(np.median(times)), np.asarray(image, dtype=np.float64)  # scoring is not timed

    rows: list[dict[str, Any]] = []
    eager_s, reference = measure(call)
    rows.append(_row("diffusers", None, False, eager_s, reference, reference, device))

    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        DeepCacheSDHelper = None
    for interval in intervals:
        if DeepCacheSDHelper is None:
            rows.append({"method": "DeepCache package", "interval": interval, "compiled": False,
                         "note": "DeepCache not installed (pip install DeepCache==0.1.1)"})
            continue
        helper = DeepCacheSDHelper(pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=helper_id)
        helper.enable()
        try:
            seconds, image = measure(call)
        finally:
            helper.disable()
        rows.append(_row("DeepCache package", interval, False, seconds, image, reference, device))

    def onediffx_rows(target: Any, compiled: bool) -> None:
        for interval in intervals:
            params = DeepCacheParams(cache_interval=interval, cache_layer_id=cache_layer_id,
                                     cache_block_id=cache_block_id)
            run = _caller(target, device, prompt, seed, steps, height, width)

            def cached() -> np.ndarray:
                with deep_cache(target, params):
                    return run()

            seconds, image = measure(cached)
            rows.append(_row("onediffx deepcache", interval, compiled, seconds, image, reference, device))

    try:
        onediffx_rows(pipe, False)
        if compile_fn is not None:
            compiled = compile_fn(pipe) or pipe
            onediffx_rows(compiled, True)
    finally:
        if stage_defaults is not None:
            enable(pipe, stage_defaults)
    if fresh is not None:
        seconds, image = measure(_caller(fresh(), device, prompt, seed, steps, height, width))
        rows.append(_row("diffusers (again, fresh pipeline)", None, False, seconds, image, reference, device))
    base_s = min(row["latency_s"] for row in rows if row["method"].startswith("diffusers"))
    for row in rows:  # against the faster eager measurement, known only now
        if "latency_s" in row:
            row["speedup"] = round(base_s / row["latency_s"], 3)
    return rows


def _caller(pipe: Any, device: torch.device, prompt: str, seed: int, steps: int, height: int,
            width: int) -> Callable[[], np.ndarray]:
    """One generation at a fixed seed, returning the image as the pipeline gives it (floats in [0, 1])."""

    def call() -> np.ndarray:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = pipe(prompt=prompt, num_inference_steps=steps, height=height, width=width, generator=generator,
                   output_type="np")
        return out.images[0]

    return call


def _row(method: str, interval: Optional[int], compiled: bool, seconds: float, image: np.ndarray,
         reference: np.ndarray, device: torch.device) -> dict[str, Any]:
    return {
        "method": method, "interval": interval, "compiled": compiled, "latency_s": round(seconds, 4),
        "speedup": None, "psnr_db": psnr(reference, image, 1.0), "device": device_name(device),
    }


