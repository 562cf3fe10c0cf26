"""Throughput at MLPerf's SDXL settings: images per second per GPU, at several batch sizes.

MLPerf Inference's SDXL benchmark runs 20 Euler steps at 1024² and reports images per second
with whatever batch the submitter chooses (about 2.37 per H200 for TensorRT fp8). Latency at batch
1 says little about that: a larger batch fills the GPU better, and the per-image host work is shared.
The ``throughput`` scenario measures, in one process on the same weights, diffusers' documented
``torch.compile`` recipe, onediffx unquantized and onediffx with each ``bench.throughput_modes``
entry, each at every ``bench.throughput_batches`` size (one pipeline call makes ``batch`` images).
Each new batch size compiles on its first call (reported in ``first_call_s``); onediffx's graphs go
through the graph cache, so a second run of the bench loads them. ``speedup_vs_recipe`` compares
images/s at the same batch size.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from ..assembly import Assembly
from ..compile import save_pipe
from ..generate import Settings, generate
from ..quantize.modes import check_supported
from .measure import median_call, timed
from .quantize import compile_for_bench, compiled_so_far, method_name, options_for, quantize_for_bench, run_options
from .recipe import RECIPE, recipe_compiled
from .steady import _free

log = logging.getLogger("onediffx.bench")


def _batch_rows(asm: Assembly, method: str, cfg: DictConfig, after_first: Callable[[], None]) -> list[dict[str, Any]]:
    """One row per batch size of ``asm.pipe`` as it is prepared now."""
    steps, rows = cfg.bench.throughput_steps, []
    for batch in cfg.bench.throughput_batches:
        settings = Settings.from_config(cfg, steps=steps, seeds=[cfg.seed + i for i in range(batch)])
        first_s, _ = timed(lambda: generate(asm, settings), asm.device)
        after_first()
        result = median_call(lambda: generate(asm, settings), asm.device, cfg.bench.repeat)
        rows.append({"scenario": "throughput", "method": method, "batch": batch, "steps": steps,
                     "e2e_s": round(result["seconds"], 4), "images_per_s": round(batch / result["seconds"], 3),
                     "first_call_s": round(first_s, 2), "peak_gib": round(result["peak_gib"], 2)
                     if result["peak_gib"] is not None else None})
        print("bench throughput row:", json.dumps(rows[-1]), flush=True)
    return rows


def _recipe_rows(asm: Assembly, cfg: DictConfig) -> list[dict[str, Any]]:
    mode = cfg.bench.recipe_mode
    with recipe_compiled(asm.pipe, mode):
        return _batch_rows(asm, f"{RECIPE} ({mode})", cfg, lambda: None)


def _onediffx_rows(asm: Assembly, mode: str, cfg: DictConfig) -> list[dict[str, Any]]:
    if mode != "off":
        check_supported(options_for(mode, run_options(cfg)).mode, asm.device)
    options, facts = quantize_for_bench(asm, mode, cfg)
    cached, hit = compile_for_bench(asm, cfg)

    def keep_new_graphs() -> None:  # each batch size's first call may compile: file it for the next run
        if cached:
            save_pipe(asm.pipe, cfg.cache.dir, overwrite=False)

    preset = OmegaConf.select(cfg, "bench.compile_preset") or cfg.compile.backend
    rows = _batch_rows(asm, method_name(mode, options, preset), cfg, keep_new_graphs)
    graphs, compile_s = compiled_so_far(asm.pipe)
    for row in rows:
        row.update({k: v for k, v in facts.items() if k in ("quantized_layers", "dtype")},
                   graphs_compiled=graphs, compile_s=compile_s, cache_hit=hit)
    return rows


def run_throughput_bench(cfg: DictConfig, fresh: Callable[[], Assembly]) -> list[dict[str, Any]]:
    """Rows: the recipe, onediffx ``quantize=off`` and each ``bench.throughput_modes`` entry, per batch size."""
    methods: list[tuple[str, Callable[[Assembly], list[dict[str, Any]]]]] = []
    if cfg.bench.recipe_peer:
        methods.append(("recipe", lambda asm: _recipe_rows(asm, cfg)))
    for mode in ["off", *(m for m in cfg.bench.throughput_modes if m != "off")]:
        methods.append((mode, lambda asm, mode=mode: _onediffx_rows(asm, mode, cfg)))
    rows: list[dict[str, Any]] = []
    asm = None
    for name, measure in methods:
        if asm is not None:
            _free(asm)
        asm = fresh()
        try:
            rows += measure(asm)
        except Exception as err:  # one method this card cannot run (or an OOM) must not lose the others
            log.exception("bench throughput %s failed", name)
            rows.append({"scenario": "throughput", "method": name,
                         "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
    recipe = {r["batch"]: r["images_per_s"] for r in rows if r.get("method", "").startswith(RECIPE) and "batch" in r}
    for row in rows:
        if "images_per_s" in row and row["batch"] in recipe:
            row["speedup_vs_recipe"] = round(row["images_per_s"] / recipe[row["batch"]], 3)
    return rows
