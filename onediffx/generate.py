"""One generation call, the same for every pipeline family.

The run command, warm-up and benchmarks all go through ``generate`` so that what is timed is what
users run. The pipeline's own progress bar shows the denoising steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from .assembly import Assembly
from .device import synchronize
from .errors import NotFoundError
from .models.pipelines import task_of



@dataclass
class Settings:
    """The effective per-call settings: run options, falling back to the model's defaults.

    Computed here once (``from_config``) for ``run``, batch lines, warm-up and the bench, so they
    can never disagree about what ``height: null`` means.
    """

    height: int
    width: int
    steps: int
    guidance: float
    seeds: list[int]
    prompt: str = ""
    negative_prompt: Optional[str] = None

    @classmethod
    def from_config(cls, cfg, **override: Any) -> "Settings":
        model = cfg.model
        values = dict(
            height=cfg.height or model.height,
            width=cfg.width or model.width,
            steps=cfg.steps or model.steps,
            guidance=model.guidance if cfg.guidance is None else cfg.guidance,
            seeds=[cfg.seed + i for i in range(cfg.num_images)],
            prompt=cfg.prompt,
            negative_prompt=cfg.negative_prompt,
        )
        values.update(override)
        return cls(**values)


@dataclass
class Generation:
    images: list[Image.Image]
    """One image per seed; for video pipelines, the first frame of each clip."""
    frames: Optional[list[list[Image.Image]]]
    seconds: float


def test_pattern(width: int, height: int) -> Image.Image:
    """A deterministic image with edges and colour, the default conditioning input."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), ((x // 16 + y // 16) % 2) * 255], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def conditioning_image(path: Optional[str], width: int, height: int) -> Image.Image:
    if path is None:
        return test_pattern(width, height)
    if not Path(path).is_file():
        raise NotFoundError(f"image: {path!r} does not exist; give a PNG/JPEG path or leave image unset")
    return Image.open(path).convert("RGB").resize((width, height))


def _generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators make an image depend on its seed only, not on the device that draws the noise.
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _arguments(asm: Assembly, s: Settings) -> dict[str, Any]:
    cfg, task = asm.cfg, task_of(asm.cfg.model.pipeline)
    args: dict[str, Any] = dict(height=s.height, width=s.width, num_inference_steps=s.steps, output_type="pil")
    if task == "img2vid":
        args.update(
            image=conditioning_image(cfg.image, s.width, s.height),
            num_frames=cfg.model.num_frames, max_guidance_scale=max(s.guidance, 1.0),
            decode_chunk_size=cfg.model.num_frames,
        )
        return args
    args.update(prompt=[s.prompt] * len(s.seeds), guidance_scale=s.guidance)
    if s.negative_prompt:
        args["negative_prompt"] = [s.negative_prompt] * len(s.seeds)
    if task == "controlnet":
        args["image"] = conditioning_image(cfg.image, s.width, s.height)
    return args


def generate(asm: Assembly, settings: Settings) -> Generation:
    """Run the pipeline once for all of ``settings.seeds`` and time it end to end."""
    asm.before_call()  # e.g. compile.progressive: switch to whole-component graphs that landed since the last call
    args = {**_arguments(asm, settings), **asm.call_kwargs}
    video = task_of(asm.cfg.model.pipeline) == "img2vid"
    synchronize(asm.device)
    start = time.perf_counter()
    if video:  # video pipelines take one clip per call
        frames = [asm.pipe(**args, generator=g).frames[0] for g in _generators(settings.seeds)]
        images = [clip[0] for clip in frames]
    else:
        images, frames = asm.pipe(**args, generator=_generators(settings.seeds)).images, None
    synchronize(asm.device)
    return Generation(images=images, frames=frames, seconds=time.perf_counter() - start)
