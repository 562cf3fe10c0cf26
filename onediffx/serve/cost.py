"""What one request may cost: pixels per image, pixel-steps, and activation memory.

A request holds a worker for about width x height x steps x images (attention grows faster still
with the pixels: on the CPU one step of the tiny model takes 0.1 s at 64x64 and 22 s at 256x256),
and its activations must fit the device. Without a bound of its own, one request within the
schema's ranges (2048x2048, 200 steps, four images) held the only worker of a tiny server for
minutes. These limits are derived from the model unless ``serve.*`` sets them, and checked before
a request is queued: a 422 naming the field to lower.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Optional

import torch
from omegaconf import DictConfig

from ..device import activation_bytes, free_memory
from ..generate import Settings

PIXELS_OVER_MODEL = 4
"""``serve.max_pixels`` by default: four times the model's own image (twice its side)."""


def prepared_sizes(cfg: DictConfig) -> list[tuple[int, int]]:
    """(width, height) of the shapes a server prepares: the warm-up shapes, else the run's size."""
    run = Settings.from_config(cfg)
    return [(s.width, s.height) for s in cfg.warmup.shapes] or [(run.width, run.height)]


@dataclass(frozen=True)
class CostLimits:
    """The most one request may ask for; ``memory_bytes`` is known once the pipelines are loaded."""

    max_pixels: int
    max_pixels_steps: int
    default_pixels: int
    """The model's image (or the largest prepared one): what a request's size is compared with."""
    default_steps: int
    dtype: torch.dtype = torch.float32
    memory_bytes: Optional[int] = None
    """Memory each replica's device had free once warm, for one call's activations."""
    device: str = "cpu"

    def problem(self, width: int, height: int, steps: int, n: int) -> Optional[tuple[str, str]]:
        """(field, one line) when a request of this size, steps and images costs too much; else ``None``."""
        pixels = width * height
        if pixels > self.max_pixels:
            return "size", (f"size: {width}x{height} is {pixels} pixels, more than serve.max_pixels={self.max_pixels} "
                            "allows; ask for a smaller size")
        cost = pixels * steps * n
        if cost > self.max_pixels_steps:
            ratios = {"steps": steps / max(1, self.default_steps), "n": float(n),
                      "size": pixels / max(1, self.default_pixels)}
            field = max(ratios, key=ratios.get)
            return field, (f"{field}: {width}x{height} x {steps} steps x {n} image(s) is {cost} pixel-steps, more "
                           f"than serve.max_pixels_steps={self.max_pixels_steps} allows; lower {field}")
        if self.memory_bytes is not None:
            need = activation_bytes(self.dtype, height, width, n)
            if need > self.memory_bytes:
                field = "n" if n > 1 and activation_bytes(self.dtype, height, width, 1) <= self.memory_bytes else "size"
                return field, (f"{field}: {width}x{height} x {n} image(s) needs at least {need / 2**30:.1f} GiB for "
                               f"activations, and {self.device} had {self.memory_bytes / 2**30:.1f} GiB free when the "
                               f"server turned ready; lower {field}")
        return None


def cost_limits(cfg: DictConfig) -> CostLimits:
    """``serve.max_pixels`` and ``serve.max_pixels_steps``, or what the model gives when they are null."""
    run = Settings.from_config(cfg)
    model_steps = max(int(cfg.model.steps or 0), run.steps)
    default_pixels = max([cfg.model.width * cfg.model.height] + [w * h for w, h in prepared_sizes(cfg)])
    max_pixels = cfg.serve.max_pixels or PIXELS_OVER_MODEL * default_pixels
    max_pixels_steps = cfg.serve.max_pixels_steps or max_pixels * model_steps * cfg.serve.max_batch
    return CostLimits(max_pixels=int(max_pixels), max_pixels_steps=int(max_pixels_steps),
                      default_pixels=default_pixels, default_steps=run.steps)


def with_free_memory(limits: CostLimits, devices: list[torch.device], dtype: torch.dtype) -> CostLimits:
    """``limits`` with the memory the replicas' devices have free now (the pipelines loaded and warm),
    shared among the replicas on one device; read once, not per request, so a request is not refused
    for memory another batch holds for a moment."""
    shares = Counter(str(d) for d in devices)
    free, device = min((free_memory(d) // shares[str(d)], str(d)) for d in devices)
    return replace(limits, memory_bytes=free, dtype=dtype, device=device)
