"""What a job writes and reports, single or batch: image files, their records, the job's facts.

Shared by ``run`` and batch runs (``onediffx.commands.batch``), so a sweep reads both the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..assembly import Assembly
from ..compile.pipe import compile_counters
from ..device import device_name
from ..generate import Generation
from ..startup import startup_facts, startup_table


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


def say_done(out_dir: Path, files: list[str], latency_per_image_s: float) -> None:
    """The closing line of a run: where its files went (absolute), and how fast it was."""
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    print(f"onediffx: wrote {shown}, metrics.json to {out_dir.resolve()} ({latency_per_image_s:.2f} s per image)",
          flush=True)
