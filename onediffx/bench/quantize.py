"""Quantization in the bench: fp8/int8 beside unquantized onediffx and the diffusers-docs recipe.

The ``quantize`` scenario runs, in one process on the same synthetic weights: diffusers eager (the
reference image and one captured UNet call), the strongest plain-PyTorch recipe from diffusers'
documentation, onediffx ``compile_pipe`` unquantized, and onediffx with each mode
of ``bench.quantize_modes`` (``quantize_pipe`` then ``compile_pipe``). Every row has its end-to-end
latency, UNet step, first call (compile or cache load included), peak memory, PSNR/SSIM of its image
against unquantized onediffx and against the same pipeline unquantized in the quantized one's dtype
(fp8 runs in bfloat16), the relative error of the captured UNet call against eager, its speed-up over eager and over
the recipe (``recipe``), and on CUDA the time to switch between two loaded LoRAs (fused from the
high-precision originals and re-quantized) with a check that unfusing is exact. Compiled graphs
go through the graph cache (``cache.dir``), so a second run of the bench loads them instead of
compiling (quantized UNets compile for minutes).

The weights are random (``model.synthetic``): the quality columns say nothing broke, not how a
real checkpoint fares under quantization.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..assembly import Assembly
from ..compile import compile_pipe, compile_state, load_pipe, save_pipe
from ..denoiser import denoiser
from ..generate import Settings, generate
from ..quantize import QuantizeConfig, quantize_pipe, quantize_state
from ..quantize.calibrate import folder_beside
from ..quantize.config import CalibrateConfig, QuantizeMode
from ..quantize.modes import check_supported, needed_dtype
from ..quantize.quality import Captured, capture_first_call, image_fidelity, output_error
from .measure import UNetProbe, matmul_peak_tflops, timed
from .recipe import RECIPE, recipe_row
from .steady import _free, _row

log = logging.getLogger("onediffx.bench")

LORA_MB = [23.0, 28.0]
"""Two LoRAs of common SDXL sizes (kohya, attention layers), switched between on each row's pipeline."""
SWITCHES = 10


def _lora_switching(pipe: Any, files: list[Path], device: torch.device) -> dict[str, Any]:
    """Median milliseconds of switching between two loaded LoRAs (fuse from the originals, re-quantize),
    and whether unfusing gave back the exact weights (quantized ones bit for bit)."""
    from ..lora import delete_adapters, load_lora_and_optionally_fuse, set_and_fuse_adapters, unfuse_lora
    from ..quantized_weights import inner_tensors

    before = {n: [t.clone() for t in (inner_tensors(p) or [p])] for n, p in denoiser(pipe).named_parameters()}
    names = [f"q{i}" for i in range(len(files))]
    for name, path in zip(names, files):
        load_lora_and_optionally_fuse(pipe, str(path), name, fuse=False, offload_device="cuda")
    times = []
    for i in range(SWITCHES + 1):
        s, _ = timed(lambda: set_and_fuse_adapters(pipe, [names[i % len(names)]], [1.0]), device)
        times.append(s)
    unfuse_lora(pipe)
    exact = all(all(torch.equal(a, b) for a, b in zip(inner_tensors(p) or [p], before[n]))
                for n, p in denoiser(pipe).named_parameters())
    delete_adapters(pipe)
    return {"lora_switch_ms": round(statistics.median(times[1:]) * 1000, 1), "lora_unfuse_exact": exact}


def quantize_for_bench(asm: Assembly, mode: str, cfg: DictConfig,
                       settings: Optional[Settings] = None) -> tuple[QuantizeConfig, dict[str, Any]]:
    """Quantize ``asm.pipe`` for a ``bench.quantize_modes`` entry (``off``: nothing); the facts of it.

    With ``settings``, the facts include the image of the same pipeline unquantized in the dtype the
    quantized one runs in (``same_dtype_reference``).
    """
    quantize, facts = options_for(mode, run_options(cfg)), {}
    if mode == "off":
        return quantize, facts
    target = needed_dtype(quantize.mode, asm.dtype)
    if target != asm.dtype:
        asm.pipe.to(dtype=target)
        asm.dtype = target
    if settings is not None:
        # Eager is enough (compiled gives the same image). With random weights, 30 steps amplify any
        # difference: fp16 against bf16 alone moves the image far, and only this reference isolates
        # what quantizing did.
        facts["same_dtype_reference"] = np.asarray(generate(asm, settings).images[0], dtype=np.float64)
    start = time.perf_counter()
    quantize_pipe(asm.pipe, options=quantize, calibration=folder_beside(cfg.cache.dir) if cfg.cache.enabled else None)
    state = quantize_state(asm.pipe)
    facts.update(quantize_s=round(time.perf_counter() - start, 2), quantized_layers=len(state.layers),
                 dtype=state.dtype, weight_mib=state.facts()["weight_mib_after"])
    asm.dtype = getattr(torch, state.dtype)
    return quantize, facts


def compile_for_bench(asm: Assembly, cfg: DictConfig) -> tuple[bool, Optional[bool]]:
    """``compile_pipe`` with the run's compile options, then the graph cache's entry if there is one.

    Returns whether graphs go through the cache and whether every component loaded from it.
    """
    options = OmegaConf.to_object(cfg.compile)
    compile_pipe(asm.pipe, options.backend, options)
    cached = bool(cfg.cache.enabled) and compile_state(asm.pipe).backend != "none"
    if not cached:
        return False, None
    found = load_pipe(asm.pipe, cfg.cache.dir)
    return True, bool(found) and all(v["hit"] for v in found.values())


def compiled_so_far(pipe: Any) -> tuple[int, float]:
    """Graphs compiled in this process and the seconds that took, over every compiled component."""
    state = compile_state(pipe)
    return (sum(c.compiles for c in state.saveable.values()),
            round(sum(sum(c.compile_seconds) for c in state.saveable.values()), 1))


def _onediffx_row(asm: Assembly, mode: str, settings: Settings, cfg: DictConfig, reference: np.ndarray,
                  captured: Captured, floor_s: float, loras: list[Path]) -> dict[str, Any]:
    quantize, facts = quantize_for_bench(asm, mode, cfg, settings)
    error = output_error(denoiser(asm.pipe), captured)
    cached, hit = compile_for_bench(asm, cfg)
    first_s, _ = timed(lambda: generate(asm, settings), asm.device)
    if cached and not hit:
        save_pipe(asm.pipe, cfg.cache.dir, overwrite=False)
    state = compile_state(asm.pipe)
    preset = OmegaConf.select(cfg, "bench.compile_preset") or cfg.compile.backend
    row = _row(method_name(mode, quantize, preset), asm, settings, cfg, first_s, reference, floor_s)
    graphs, compile_s = compiled_so_far(asm.pipe)
    row.update(facts, unet_rel_error=None if error is None else round(error, 5), cache_hit=hit,
               graphs_compiled=graphs, compile_s=compile_s,
               first_call_includes="cache load" if hit else ("compile" if cached or state.backend != "none" else None))
    if loras and not quantize.calibrate.enabled:  # calibrated layers refuse LoRAs (they would clip)
        row.update(_lora_switching(asm.pipe, loras, asm.device))
    return row


STATIC_SUFFIX = "_static"
"""``bench.quantize_modes`` entries ending so (``fp8_static``) calibrate static activation scales, as
the ``conf/quantize/<mode>_static.yaml`` presets do."""


def options_for(name: str, base: Optional[QuantizeConfig] = None) -> QuantizeConfig:
    """The quantize options a ``bench.quantize_modes`` entry stands for, on top of the run's ``quantize``
    options (``quantize.convs=true quantize.attention=true`` reach every row that can take them).

    Static entries calibrate (the run's ``quantize.calibrate`` if set, else 4 prompts of 4 steps);
    dynamic ones have no calibrated scales and so no 8-bit convolutions."""
    base = base or QuantizeConfig()
    if name.endswith(STATIC_SUFFIX):
        calibrate = base.calibrate if base.calibrate.enabled else replace(base.calibrate, prompts=4, steps=4)
        return replace(base, mode=QuantizeMode(name[: -len(STATIC_SUFFIX)]), calibrate=calibrate)
    return replace(base, mode=QuantizeMode(name), calibrate=replace(base.calibrate, prompts=0), convs=False)


def run_options(cfg: DictConfig) -> Optional[QuantizeConfig]:
    """The run's own ``quantize`` options, the base of every bench row's."""
    node = OmegaConf.select(cfg, "quantize")
    return None if node is None else OmegaConf.to_object(node)


def method_name(mode: str, options: QuantizeConfig, preset: str) -> str:
    """``onediffx quantize=fp8_static+convs+attention compile=inductor``: what a row ran."""
    extras = "".join(f"+{flag}" for flag in ("convs", "attention") if mode != "off" and getattr(options, flag))
    return f"onediffx quantize={mode}{extras} compile={preset}"


def _say(rows: list[dict[str, Any]]) -> None:
    """Each row as it is measured, so a run cut short by a time limit still shows what it had."""
    for row in rows:
        shown = {k: v for k, v in row.items() if k not in ("image", "same_dtype_reference")}  # arrays, kept for scoring
        print("bench quantize row:", json.dumps(shown, default=str), flush=True)


def run_quantize_bench(asm: Assembly, cfg: DictConfig, fresh: Callable[[], Assembly]) -> list[dict[str, Any]]:
    """Rows: eager, the diffusers-docs recipe, onediffx unquantized, onediffx per ``bench.quantize_modes``."""
    settings = Settings.from_config(cfg)
    device = asm.device
    chosen = OmegaConf.select(cfg, "bench.quantize_modes")  # [] is a choice: no quantized rows
    modes = [m for m in (["fp8", "int8"] if chosen is None else chosen) if m != "off"]
    probe = UNetProbe(denoiser(asm.pipe))
    with capture_first_call(denoiser(asm.pipe)) as captured:
        first_s, _ = timed(lambda: generate(asm, settings), device)
    flops = probe.flops(denoiser(asm.pipe))
    peak = matmul_peak_tflops(device, asm.dtype if device.type == "cuda" else torch.float32)
    floor_s = flops / (peak * 1e12)
    rows = [_row("diffusers eager", asm, settings, cfg, first_s, None, floor_s)]
    reference = rows[0]["image"]
    loras: list[Path] = []
    if device.type == "cuda":  # generated from the unquantized weights, read by every row
        from .lora import _generate

        folder = Path(tempfile.mkdtemp(prefix="onediffx-qlora-"))
        loras = [path for path, _ in _generate(asm.pipe, LORA_MB, folder)]
    if OmegaConf.select(cfg, "bench.recipe_peer", default=True):
        rows.append(recipe_row(asm, settings, cfg, reference, floor_s, _row,
                               OmegaConf.select(cfg, "bench.recipe_mode") or "reduce-overhead"))
    _say(rows)
    for mode in ["off", *modes]:
        left = _free(asm)
        asm = fresh()
        try:
            check_supported(options_for(mode, run_options(cfg)).mode, device) if mode != "off" else None
            rows.append(_onediffx_row(asm, mode, settings, cfg, reference, captured, floor_s, loras))
            if left is not None:  # the row's own memory: what earlier rows left allocated is not its
                rows[-1].update(left_by_earlier_rows_gib=round(left, 2), own_peak_gib=round(rows[-1]["peak_gib"] - left, 2))
        except Exception as err:  # one mode this card cannot run (or an OOM) must not lose the others
            log.exception("bench quantize=%s failed", mode)
            rows.append({"scenario": "quantize", "method": f"onediffx quantize={mode}",
                         "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
        _say(rows[-1:])
    eager = rows[0]["e2e_s"]
    recipe = next((r["e2e_s"] for r in rows if r.get("method", "").startswith(RECIPE)), None)
    unquantized = next((r.get("image") for r in rows if r.get("method", "").startswith("onediffx quantize=off")), None)
    for row in rows:
        row["scenario"] = "quantize"
        image, same_dtype = row.pop("image", None), row.pop("same_dtype_reference", None)
        if "e2e_s" not in row:
            continue
        row["speedup"] = round(eager / row["e2e_s"], 3)
        row["speedup_vs_recipe"] = None if recipe is None else round(recipe / row["e2e_s"], 3)
        if image is not None and row is not rows[0]:
            ssim = image_fidelity(reference.astype(np.uint8), image.astype(np.uint8))[1]
            row["ssim_vs_eager"] = None if ssim is None else round(ssim, 4)
        if image is not None and unquantized is not None and row.get("quantized_layers"):
            # the reference: the same onediffx pipeline, unquantized, same seed
            psnr, ssim = image_fidelity(unquantized.astype(np.uint8), image.astype(np.uint8))
            row["psnr_vs_unquantized_db"] = round(psnr, 2)
            row["ssim_vs_unquantized"] = None if ssim is None else round(ssim, 4)
        if image is not None and same_dtype is not None:
            psnr, ssim = image_fidelity(same_dtype.astype(np.uint8), image.astype(np.uint8))
            row["psnr_vs_unquantized_same_dtype_db"] = round(psnr, 2)
            row["ssim_vs_unquantized_same_dtype"] = None if ssim is None else round(ssim, 4)
    rows[0]["quality_note"] = "random (synthetic) weights: PSNR/SSIM/rel. error show nothing broke, not real-model quality"
    return rows
