"""``python -m onediffx run``: assemble, generate, write images and metrics to Hydra's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..compile.pipe import compile_counters
from ..compile.progressive import finish as finish_progressive
from ..device import device_name, peak_memory_gib, reset_peak_memory
from ..generate import Generation, Settings, generate
from ..launch import startup_facts, startup_table
from ..metrics import latency_summary, versions, write_json
from ..resolver import assemble
from ..stages.base import Assembly
from ..sweep.gpus import job_device


def save_outputs(out_dir: Path, result: Generation, seeds: list[int]) -> list[str]:
    """PNG per image (and per video frame, plus an animated GIF per clip); returns the file names."""
    names = []
    for i, (seed, image) in enumerate(zip(seeds, result.images)):
        if result.frames is None:
            name = f"image_{i:03d}_seed{seed}.png"
            image.save(out_dir / name)
            names.append(name)
            continue
        clip = result.frames[i]
        name = f"video_{i:03d}_seed{seed}.gif"
        clip[0].save(out_dir / name, save_all=True, append_images=clip[1:], duration=1000 // 7, loop=0)
        for j, frame in enumerate(clip):
            frame.save(out_dir / f"video_{i:03d}_seed{seed}_frame{j:03d}.png")
        names.append(name)
    return names


def image_records(result: Generation, files: list[str], seeds: list[int], prompt: str,
                  negative_prompt: Optional[str]) -> list[dict[str, Any]]:
    """Each PNG written, with the prompt and seed that made it: how sweep summaries pair images."""
    records = []
    for i, (seed, name) in enumerate(zip(seeds, files)):
        frames = [name] if result.frames is None else [
            name.replace(".gif", f"_frame{j:03d}.png") for j in range(len(result.frames[i]))]
        records += [dict(file=f, seed=seed, frame=j, prompt=prompt, negative_prompt=negative_prompt)
                    for j, f in enumerate(frames)]
    return records


def job_facts(cfg: DictConfig, asm: Assembly) -> dict[str, Any]:
    """What every job reports about its pipeline, single or batch: device, stages, start-up."""
    return {
        "model": cfg.model.name,
        "device": str(asm.device),
        "device_name": device_name(asm.device),
        "dtype": str(asm.dtype).replace("torch.", ""),
        "stages": {name: facts for name, facts in asm.report.items()},
        "active_stages": [n for n, f in asm.report.items() if f.get("enabled", True) and n != "load"],
        "startup": startup_facts(asm.report, cfg.compile.backend),
        "compile_counters": compile_counters(asm.pipe),
    }


def print_startup(cfg: DictConfig, asm: Assembly, first_image_s: Optional[float]) -> None:
    """The start-up table a launch prints (``startup_report=true``, set by ``conf/launch/`` presets)."""
    if not cfg.startup_report:
        return
    choice = HydraConfig.get().runtime.choices.get("launch") if HydraConfig.initialized() else None
    title = f"start-up{f' of launch {choice}' if choice else ''}: model {cfg.model.name} on {asm.device}"
    print(startup_table(asm.report, backend=cfg.compile.backend, cache_dir=cfg.cache.dir, title=title,
                        first_image_s=first_image_s), flush=True)


def run_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one job (on the GPU it leases, in a multi-GPU sweep) and return its ``metrics.json``."""
    with job_device(cfg) as pinned:
        if pinned is not None:
            cfg.device = pinned
        return _run_job(cfg, out_dir)


def _run_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    if cfg.prompts:
        from ..batch import run_batch

        return run_batch(cfg, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    asm = assemble(cfg)
    settings = Settings.from_config(cfg)
    reset_peak_memory(asm.device)
    calls = [generate(asm, settings) for _ in range(cfg.repeat)]
    files = save_outputs(out_dir, calls[-1], settings.seeds)
    finish_progressive(asm)
    print_startup(cfg, asm, calls[0].seconds)
    metrics = {
        "status": "ok",
        **job_facts(cfg, asm),
        "height": settings.height,
        "width": settings.width,
        "steps": settings.steps,
        "seeds": settings.seeds,
        **latency_summary([c.seconds for c in calls], len(settings.seeds), settings.steps),
        "peak_memory_gib": peak_memory_gib(asm.device),
        "outputs": files,
        "images": image_records(calls[-1], files, settings.seeds, cfg.prompt, cfg.negative_prompt),
        "versions": versions(),
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics
