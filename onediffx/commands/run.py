"""``python -m onediffx run``: assemble, generate, write images and metrics to Hydra's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .batch.runner import run_batch
from ..errors import NonFiniteError
from ..device import peak_memory_gib, reset_peak_memory
from ..generate import Settings, generate
from ..metrics import latency_summary, versions, write_json
from ..resolver import assemble
from .gpus import job_device
from .lock import folder_lock
from .outputs import image_records, job_facts, print_startup, save_outputs, say_done


def run_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one job (on the GPU it leases, in a multi-GPU sweep) and return its ``metrics.json``."""
    with folder_lock(out_dir), job_device(cfg) as pinned:
        if pinned is not None:
            cfg.device = pinned
        if OmegaConf.select(cfg, "parallel.kind", default="off") != "off" and not cfg.parallel.rank:
            from .parallel_peer import peer_process

            with peer_process(cfg):
                return _run_job(cfg, out_dir)
        return _run_job(cfg, out_dir)


def _run_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    if cfg.prompts:
        return run_batch(cfg, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    asm = assemble(cfg)
    settings = Settings.from_config(cfg)
    reset_peak_memory(asm.device)
    try:
        calls = [generate(asm, settings) for _ in range(cfg.repeat)]
    except NonFiniteError as err:  # no image is written: a black one would look like a result
        asm.close()
        write_json(out_dir / "metrics.json", {"status": "failed", "error": str(err), "error_type": type(err).__name__,
                                              "non_finite_step": err.step, **job_facts(cfg, asm),
                                              "versions": versions()})
        raise
    files = save_outputs(out_dir, calls[-1], settings.seeds)
    asm.close()
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
    say_done(out_dir, files, metrics["latency_per_image_s"])
    return metrics
