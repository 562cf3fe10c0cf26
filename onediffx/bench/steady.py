"""Steady state: diffusers eager, plain ``torch.compile`` of the UNet, onediffx ``compile_pipe``.

All run in one process on the same weights, one after the other, so the ratios compare like with
like. Each row reports end-to-end latency, it/s, the UNet step against the FLOP floor, peak
memory, and PSNR of its image against the eager one. Eager is measured twice, first and last (on
a freshly loaded pipeline, since compiling changed the first one in place): the first scenario of
a process has measured up to 40% slower on an H200, and speed-ups are quoted against the faster
of the two, so a slow first measurement never flatters the compiled rows.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..assembly import Assembly
from ..compile import compile_options, compile_pipe
from ..denoiser import denoiser, denoiser_name
from ..device import allocated_gib, empty_cache
from ..generate import Settings, generate
from .measure import UNetProbe, matmul_peak_tflops, median_call, psnr, timed

log = logging.getLogger("onediffx.bench")


def _row(name: str, asm: Assembly, settings: Settings, cfg: DictConfig, first_s: float,
         reference: np.ndarray | None, floor_s: float) -> dict[str, Any]:
    resident = allocated_gib(asm.device)  # weights, graphs and their pools: what the peak adds activations to
    result = median_call(lambda: generate(asm, settings), asm.device, cfg.bench.repeat)
    image = np.asarray(result["output"].images[0], dtype=np.float64)
    probe = UNetProbe(denoiser(asm.pipe))
    generate(asm, replace(settings, steps=1))
    step = probe.step_seconds(denoiser(asm.pipe), asm.device, cfg.bench.unet_iters)
    return {
        "scenario": "steady", "method": name, "e2e_s": round(result["seconds"], 4),
        "it_per_s": round(settings.steps / result["seconds"], 2), "first_call_s": round(first_s, 2),
        "unet_step_ms": round(step * 1000, 2), "unet_floor_ms": round(floor_s * 1000, 2),
        "peak_gib": round(result["peak_gib"], 2), "resident_gib": None if resident is None else round(resident, 2),
        "psnr_vs_eager_db": None if reference is None else psnr(reference, image, 255), "image": image,
    }


def _free(asm: Assembly) -> Optional[float]:
    """Free ``asm``'s pipeline; return the GiB still allocated afterwards (``None`` off the GPU).

    A row's peak counts everything the process holds, so what an earlier row left behind is
    logged and charged to it, not to the next row.
    """
    asm.pipe = None
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    empty_cache(asm.device)
    left = allocated_gib(asm.device)
    if left is not None:
        log.info("bench: %.2f GiB still allocated after releasing the previous pipeline", left)
    return left


def _release(asm: Assembly, fresh: Callable[[], Assembly]) -> Assembly:
    """A freshly loaded pipeline, after freeing ``asm``'s (so peak memory is the new one's own)."""
    _free(asm)
    return fresh()


def _onediffx_row(asm: Assembly, preset: str, options: Any, settings: Settings, cfg: DictConfig,
                  reference: np.ndarray, floor_s: float) -> dict[str, Any]:
    compile_pipe(asm.pipe, options.backend, options)
    first_s, _ = timed(lambda: generate(asm, settings), asm.device)
    return _row(f"onediffx compile={preset}", asm, settings, cfg, first_s, reference, floor_s)


def _eager_again(asm: Assembly, fresh: Callable[[], Assembly], settings: Settings, cfg: DictConfig,
                 reference: np.ndarray, floor_s: float) -> dict[str, Any]:
    again = _release(asm, fresh)
    first_s, _ = timed(lambda: generate(again, settings), again.device)
    return _row("diffusers eager (again, fresh pipeline)", again, settings, cfg, first_s, reference, floor_s)


def _peer_row(asm: Assembly, settings: Settings, cfg: DictConfig, reference: np.ndarray,
              floor_s: float) -> dict[str, Any]:
    """Plain ``torch.compile`` of the UNet (channels-last, fullgraph), as its documentation advises."""
    name = denoiser_name(asm.pipe)
    eager_model = getattr(asm.pipe, name)
    eager_model.to(memory_format=torch.channels_last)
    setattr(asm.pipe, name, torch.compile(eager_model, fullgraph=True))
    first_s, _ = timed(lambda: generate(asm, settings), asm.device)
    row = _row(f"torch.compile({name}) channels-last", asm, settings, cfg, first_s, reference, floor_s)
    setattr(asm.pipe, name, eager_model)
    torch._dynamo.reset()
    return row


def run_steady(asm: Assembly, cfg: DictConfig, fresh: Optional[Callable[[], Assembly]] = None) -> list[dict[str, Any]]:
    """Rows for eager, plain torch.compile, onediffx on ``asm.pipe``, and eager again on ``fresh()``.

    With ``fresh``, ``asm.pipe`` is released before the last row; without it, it is left compiled.
    """
    settings = Settings.from_config(cfg)
    device = asm.device
    probe = UNetProbe(denoiser(asm.pipe))
    first_s, _ = timed(lambda: generate(asm, settings), device)
    flops = probe.flops(denoiser(asm.pipe))
    peak = matmul_peak_tflops(device, asm.dtype if device.type == "cuda" else torch.float32)
    floor_s = flops / (peak * 1e12)
    rows = [_row("diffusers eager", asm, settings, cfg, first_s, None, floor_s)]
    rows[0].update(unet_tflop=round(flops / 1e12, 2), matmul_peak_tflops=round(peak, 1))
    reference = rows[0]["image"]
    if cfg.bench.peer_compile:
        rows.append(_peer_row(asm, settings, cfg, reference, floor_s))
    if fresh is not None and cfg.bench.peer_compile and OmegaConf.select(cfg, "bench.recipe_peer", default=False):
        from .recipe import recipe_row  # diffusers' documented recipe compiles the pipeline in place

        rows.append(recipe_row(asm, settings, cfg, reference, floor_s, _row, cfg.bench.recipe_mode))
        asm = _release(asm, fresh)

    options = OmegaConf.to_object(cfg.compile)
    preset = OmegaConf.select(cfg, "bench.compile_preset") or options.backend
    rows.append(_onediffx_row(asm, preset, options, settings, cfg, reference, floor_s))
    if fresh is not None:
        for other in OmegaConf.select(cfg, "bench.also_presets") or []:
            asm = _release(asm, fresh)
            rows.append(_onediffx_row(asm, other, compile_options(other), settings, cfg, reference, floor_s))
        rows.append(_eager_again(asm, fresh, settings, cfg, reference, floor_s))
    base = min(row["e2e_s"] for row in rows if row["method"].startswith("diffusers eager"))
    recipe = next((row["e2e_s"] for row in rows if row["method"].startswith("diffusers-docs")), None)
    for row in rows:
        row["speedup"] = round(base / row["e2e_s"], 3)
        if recipe is not None:
            row["speedup_vs_recipe"] = round(recipe / row["e2e_s"], 3)
        row.pop("image")
    return rows
