"""One generation call, the same for every pipeline family.

The run command, warm-up and benchmarks all go through ``generate`` so that what is timed is what
users run. The pipeline's own progress bar shows the denoising steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from .assembly import Assembly
from .device import synchronize
from .errors import ConfigError, NonFiniteError, NotFoundError
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
    prompts: Optional[list[str]] = None
    """One prompt per seed (a server batching requests); ``None``: ``prompt`` for every seed."""
    negative_prompts: Optional[list[str]] = None
    """One negative prompt per seed, used with ``prompts``; ``None``: ``negative_prompt``."""
    on_step: Optional[Callable[[int], None]] = None
    """Called with the number of denoising steps done after each step (a server streams progress)."""

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
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize((width, height))
    except (OSError, Image.DecompressionBombError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise ConfigError(f"image: {path!r} is not an image Pillow can read ({str(err).splitlines()[0][:120]}); "
                          "give a PNG or JPEG file") from None


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
    args.update(prompt=list(s.prompts) if s.prompts is not None else [s.prompt] * len(s.seeds),
                guidance_scale=s.guidance)
    if s.negative_prompts is not None:
        args["negative_prompt"] = list(s.negative_prompts)
    elif s.negative_prompt:
        args["negative_prompt"] = [s.negative_prompt] * len(s.seeds)
    if task == "controlnet":
        from .instantid.hook import is_instantid_pipeline

        if is_instantid_pipeline(asm.pipe):  # the face's key points, embedding and scales (onediffx.instantid)
            from .instantid.call import call_arguments

            args.update(call_arguments(asm.pipe, cfg.face, s.width, s.height, s.guidance))
        else:
            args["image"] = conditioning_image(cfg.image, s.width, s.height)
    return args


def generate(asm: Assembly, settings: Settings) -> Generation:
    """Run the pipeline once for all of ``settings.seeds`` and time it end to end."""
    asm.before_call()  # e.g. compile.progressive: switch to whole-component graphs that landed since the last call
    watch = FiniteWatch()
    args = {**_arguments(asm, settings), **asm.call_kwargs, "callback_on_step_end": watch.callback(settings.on_step)}
    video = task_of(asm.cfg.model.pipeline) == "img2vid"
    synchronize(asm.device)
    start = time.perf_counter()
    if video:  # video pipelines take one clip per call
        frames = [asm.pipe(**args, generator=g).frames[0] for g in _generators(settings.seeds)]
        images = [clip[0] for clip in frames]
    else:
        images, frames = asm.pipe(**args, generator=_generators(settings.seeds)).images, None
    synchronize(asm.device)
    seconds = time.perf_counter() - start
    asm.after_call()  # e.g. save-graph: keep what this call compiled, before a bad image can stop the run
    watch.check(settings.steps)
    return Generation(images=images, frames=frames, seconds=seconds)


class FiniteWatch:
    """Finds the first denoising step whose latents hold NaN or Inf, without waiting for the device.

    ``guidance`` near its limit, a LoRA with broken factors or half precision overflowing turn the
    latents non-finite, and the PIL conversion then writes an all-black image that looks like a
    result. The check per step is two small kernels queued behind the step (no synchronisation);
    the one read of the flag happens after the call, when the device is idle anyway.
    """

    def __init__(self) -> None:
        self.first: Optional[torch.Tensor] = None

    def callback(self, on_step: Optional[Callable[[int], None]]) -> Callable[..., dict[str, Any]]:
        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            latents = kwargs.get("latents")
            if isinstance(latents, torch.Tensor):
                bad = ~torch.isfinite(latents).all()
                if self.first is None:
                    self.first = torch.full((), -1, dtype=torch.int64, device=latents.device)
                self.first = torch.where((self.first < 0) & bad, step, self.first)
            if on_step is not None:
                on_step(step + 1)
            return kwargs

        return step_end

    def check(self, steps: int) -> None:
        first = -1 if self.first is None else int(self.first)
        if first >= 0:
            raise NonFiniteError(
                f"the latents became NaN/Inf at denoising step {first + 1} of {steps}, so the image would be "
                "blank; lower guidance or the LoRA scales, check the LoRA files, or run in float32 (dtype=float32)",
                step=first + 1,
            )
