"""``python -m onediffx run``: assemble, generate, write images and metrics to Hydra's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..device import device_name, peak_memory_gib, reset_peak_memory
from ..generate import Generation, Settings, generate
from ..metrics import latency_summary, versions, write_json
from ..resolver import assemble


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


def run_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one job and return what was written to ``metrics.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    asm = assemble(cfg)
    settings = Settings.from_config(cfg)
    reset_peak_memory(asm.device)
    calls = [generate(asm, settings) for _ in range(cfg.repeat)]
    files = save_outputs(out_dir, calls[-1], settings.seeds)
    metrics = {
        "status": "ok",
        "model": cfg.model.name,
        "device": str(asm.device),
        "device_name": device_name(asm.device),
        "dtype": str(asm.dtype).replace("torch.", ""),
        "height": settings.height,
        "width": settings.width,
        "steps": settings.steps,
        "seeds": settings.seeds,
        "stages": {name: facts for name, facts in asm.report.items()},
        "active_stages": [n for n, f in asm.report.items() if f.get("enabled", True) and n != "load"],
        **latency_summary([c.seconds for c in calls], len(settings.seeds), settings.steps),
        "peak_memory_gib": peak_memory_gib(asm.device),
        "outputs": files,
        "versions": versions(),
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics
