"""``python -m onediffx bench``: the scenarios of ``conf/bench.yaml``, peers and onediffx side by side.

Steady-state, LoRA and DeepCache scenarios share one process and one pipeline (loaded fresh for
each scenario, so one scenario's changes never leak into the next); cold start runs its own
processes. Results go to ``bench.json`` and ``bench.md`` in the output folder and are printed.
"""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from ..device import device_name, empty_cache, resolve_device, resolve_dtype
from ..errors import BenchError, ConfigError
from ..generate import Settings
from ..bench.record import GpuWatch, provenance, record_path
from ..models.loader import load_pipeline
from ..assembly import Assembly

log = logging.getLogger("onediffx.bench")

REPO = Path(__file__).resolve().parents[2]
"""The checkout whose commit a record names (an installed wheel has none: ``ONEDIFFX_COMMIT``)."""


def _fresh(cfg: DictConfig) -> Assembly:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, cfg.model.dtype, device)
    pipe = load_pipeline(cfg.model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return Assembly(pipe=pipe, cfg=cfg, device=device, dtype=dtype)


def _steady(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    from ..bench.steady import run_steady

    return run_steady(_fresh(cfg), cfg, fresh=lambda: _fresh(cfg))


def _cold_start(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    from ..bench.cold_start import run_cold_start

    return run_cold_start(cfg)


def _lora(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    from ..bench.lora import run_lora_bench

    asm = _fresh(cfg)
    rows = run_lora_bench(asm.pipe, asm.device, list(cfg.bench.lora_sizes_mb), tmp_dir=None)
    return [{"scenario": "lora", **row} for row in rows]


def _deepcache(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    from ..bench.deepcache import run_deepcache_bench
    from ..compile import compile_pipe

    asm = _fresh(cfg)
    settings = Settings.from_config(cfg)
    options = OmegaConf.to_object(cfg.compile)
    compile_fn = (lambda pipe: compile_pipe(pipe, options.backend, options)) if cfg.bench.deepcache_compile else None
    rows = run_deepcache_bench(asm.pipe, asm.device, list(cfg.bench.deepcache_intervals), settings.steps,
                               settings.height, settings.width, compile_fn, prompt=cfg.prompt, seed=cfg.seed,
                               repeat=cfg.bench.repeat, fresh=lambda: _fresh(cfg).pipe)
    return [{"scenario": "deepcache", **row} for row in rows]


def _instantid(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    from ..bench.instantid import run_instantid_bench

    return run_instantid_bench(_fresh(cfg), cfg, list(cfg.bench.deepcache_intervals), cfg.bench.repeat)


def _quantize(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    from ..bench.quantize import run_quantize_bench

    return run_quantize_bench(_fresh(cfg), cfg, fresh=lambda: _fresh(cfg))


def _throughput(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    from ..bench.throughput import run_throughput_bench

    return run_throughput_bench(cfg, fresh=lambda: _fresh(cfg))


def _parallel(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    from ..bench.parallel import run_parallel_bench

    return run_parallel_bench(cfg)


def _serve(cfg: DictConfig, out_dir: Path) -> list[dict[str, Any]]:
    from ..bench.serve import run_serve_bench

    return run_serve_bench(cfg, logs=out_dir / "serve-logs")


RUNNERS: dict[str, Callable[[DictConfig, Path], list[dict[str, Any]]]] = {
    "steady": _steady, "cold_start": _cold_start, "lora": _lora, "deepcache": _deepcache,
    "instantid": _instantid, "quantize": _quantize, "serve": _serve,
    "throughput": _throughput, "parallel": _parallel,
}


PEER_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_modes(cfg: DictConfig) -> None:
    """Refuse an unknown quantize mode or batch size before any model loads (not as an error row later)."""
    from ..bench.quantize import options_for

    for key in ("quantize_modes", "throughput_modes"):
        for i, mode in enumerate(cfg.bench[key]):
            try:
                options_for(mode)
            except ValueError:
                raise ConfigError(f"bench.{key}[{i}]: unknown quantize mode {mode!r}; known: off, fp8, int8, "
                                  "fp8_weight_only, int8_weight_only, fp8_static, int8_static") from None
    for i, batch in enumerate(cfg.bench.throughput_batches):
        if batch < 1:
            raise ConfigError(f"bench.throughput_batches[{i}]: {batch} images per call; give a size of at least 1")


def bench_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run each scenario in ``bench.scenarios`` and write the report."""
    from ..bench.report import write_report

    for i, scenario in enumerate(cfg.bench.scenarios):
        if scenario not in RUNNERS:
            raise ConfigError(f"bench.scenarios[{i}]: unknown scenario {scenario!r}; known: {', '.join(RUNNERS)}")
    if "serve" in cfg.bench.scenarios and not (cfg.bench.serve_onediffx or cfg.bench.serve_peer):
        raise ConfigError("bench.serve_onediffx=false needs bench.serve_peer=true: the serve scenario would drive no server")
    if cfg.bench.serve_sizes not in (1, 2):
        raise ConfigError(f"bench.serve_sizes: {cfg.bench.serve_sizes} is not 1 or 2 (the run's size, then a landscape one)")
    mode = cfg.bench.serve_peer_mode
    if mode is not None and mode not in PEER_MODES:
        raise ConfigError(f"bench.serve_peer_mode: unknown torch.compile mode {mode!r}; known: {', '.join(PEER_MODES)}")
    _check_modes(cfg)
    name = record_name(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    device = resolve_device(cfg.device)
    settings = Settings.from_config(cfg)
    header = {**provenance(device_name(device), REPO), "scenario": name, "model": cfg.model.name,
              "synthetic": bool(cfg.model.synthetic), "height": settings.height, "width": settings.width,
              "steps": settings.steps, "overrides": _overrides()}
    rows: list[dict[str, Any]] = []
    with GpuWatch((device.index or 0) if device.type == "cuda" else None) as watch:
        for scenario in cfg.bench.scenarios:
            try:
                rows += RUNNERS[scenario](cfg, out_dir)
            except Exception as err:  # one scenario's failure (an OOM, say) must not lose the others' rows
                log.exception("bench scenario %s failed", scenario)
                rows.append({"scenario": scenario, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
            header.update(watch.summary())
            write_report(out_dir, header, rows)  # after each scenario, so a timeout keeps what was measured
            gc.collect()
            empty_cache(device)
    header.update(watch.summary())
    header["headline"] = bool(cfg.bench.headline) and header["gpu_alone"] is True
    print(write_report(out_dir, header, rows), flush=True)
    if cfg.bench.record_dir:
        path = record_path(Path(cfg.bench.record_dir), header, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_report(path.parent, header, rows, stem=path.stem)
        print(f"bench record: {path}", flush=True)
    if cfg.bench.headline and not header["headline"]:
        raise BenchError(_not_headline(header))
    return {"rows": rows}


def record_name(cfg: DictConfig) -> str:
    """``bench.record_name``, or the model and scenarios (``sdxl-quantize-cold-start``); checked up front."""
    name = cfg.bench.record_name or "-".join([cfg.model.name, *cfg.bench.scenarios]).replace("_", "-").lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ConfigError(f"bench.record_name: {name!r} is not a name of lower-case letters, digits and dashes")
    return name


def _overrides() -> list[str]:
    """The command line's overrides: with the commit, what reruns the record."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _not_headline(header: dict[str, Any]) -> str:
    if header["gpu_alone"] is None:
        return ("bench.headline: whether another process used the GPU could not be read (no NVML, or its "
                "process ids are not this namespace's); the record is written as not headline")
    others = ", ".join(f"pid {p['pid']} ({p['name'] or '?'}, {p['used_mib']} MiB)" for p in header["gpu_others"])
    return (f"bench.headline: another process used the GPU during the run ({others}); the record is written "
            "as not headline: rerun with the GPU to this bench alone")
