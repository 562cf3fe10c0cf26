"""InstantID benchmark: the eager InstantID pipeline, compiled, and compiled with DeepCache, in one process.

Same pipeline, face, prompt and seed for every row; each image is scored by PSNR against the eager
uncached image (the reference) and against the compiled uncached one (what DeepCache alone costs).
DeepCache rows come twice per interval: with the IdentityNet skipped on cached steps (its last
residuals reused: ``face.controlnet_on_cached_steps=skip``) and run at every step, so the table
shows what skipping it saves and what it costs. ``identitynet_runs`` counts its forwards per image.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..assembly import Assembly
from ..compile import compile_pipe
from ..deep_cache import DeepCacheParams, disable, enable
from ..device import device_name
from ..generate import Settings, generate
from .measure import median_call, psnr, timed


def _image(result: dict[str, Any]) -> np.ndarray:
    return np.asarray(result["output"].images[0], dtype=np.float64)


def _runs(pipe: Any) -> int:
    """IdentityNet forwards run so far (calls minus those DeepCache's cached steps skipped)."""
    counts = pipe.__dict__.get("identitynet_counts", {})
    return counts.get("calls", 0) - counts.get("skipped", 0)


def run_instantid_bench(asm: Assembly, cfg: Any, intervals: Sequence[int] = (3,), repeat: int = 3) -> list[dict[str, Any]]:
    """Rows: eager; ``compile_pipe`` with ``cfg.compile``; then DeepCache per interval, IdentityNet skipped or run."""
    from omegaconf import OmegaConf

    pipe, device = asm.pipe, asm.device
    settings = Settings.from_config(cfg)
    rows: list[dict[str, Any]] = []

    def measure(method: str, interval: Any, identitynet: str, compiled: bool, first_s: float,
                references: dict[str, np.ndarray]) -> np.ndarray:
        before = _runs(pipe)
        result = median_call(lambda: generate(asm, settings), device, repeat)
        image = _image(result)
        rows.append({
            "scenario": "instantid", "method": method, "interval": interval, "identitynet": identitynet,
            "compiled": compiled, "e2e_s": round(result["seconds"], 4), "first_call_s": round(first_s, 2),
            "it_per_s": round(settings.steps / result["seconds"], 2), "peak_gib": round(result["peak_gib"], 2),
            "identitynet_runs": (_runs(pipe) - before) // repeat,
            **{f"psnr_vs_{name}_db": psnr(ref, image, 255) for name, ref in references.items()},
            "device": device_name(device),
        })
        return image

    first_s, _ = timed(lambda: generate(asm, settings), device)
    eager = measure("InstantID eager (diffusers + face tokens)", None, "every step", False, first_s, {})
    options = OmegaConf.to_object(cfg.compile)
    compile_pipe(pipe, options.backend, options)
    first_s, _ = timed(lambda: generate(asm, settings), device)
    compiled = measure(f"onediffx compile={options.backend}", None, "every step", True, first_s, {"eager": eager})
    references = {"eager": eager, "compiled": compiled}
    chosen = cfg.face.controlnet_on_cached_steps
    for interval in intervals:  # each call arms DeepCache anew, as under the deepcache stage
        enable(pipe, DeepCacheParams(cache_interval=interval))
        for choice in ("skip", "run"):
            cfg.face.controlnet_on_cached_steps = choice  # what generate hands the pipeline
            first_s, _ = timed(lambda: generate(asm, settings), device)
            measure(f"onediffx compile + deepcache i{interval}", interval,
                    "full steps only" if choice == "skip" else "every step", True, first_s, references)
    disable(pipe)
    cfg.face.controlnet_on_cached_steps = chosen
    base = rows[0]["e2e_s"]
    for row in rows:
        row["speedup"] = round(base / row["e2e_s"], 3)
    return rows
