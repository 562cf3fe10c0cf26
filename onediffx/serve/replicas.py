"""One assembled pipeline per device, each owned by one worker thread.

A replica is the ``run`` command's pipeline (``onediffx.resolver.assemble``: LoRA stack fused,
DeepCache, compiled graphs loaded from the cache, warmed) plus what a server adds per call: the
LoRA weights a batch asks for (``set_and_fuse_adapters`` re-fuses from the original weights, tens
of milliseconds), the batch's DeepCache interval, and padding to a warmed batch size.
"""

from __future__ import annotations

import copy
import io
import time
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from ..assembly import Assembly
from ..config.schema import LoraStack, ShapeConfig, serve_options
from ..errors import ConfigError
from ..generate import Settings, generate
from ..resolver import assemble
from .scheduler import BatchKey, Job


def replica_devices(cfg: DictConfig) -> list[str]:
    """The device of each replica ``serve.replicas`` asks for (``N`` or ``all``)."""
    import torch

    wanted = serve_options(cfg).replica_count
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else 0
    count = max(gpus, 1) if wanted is None else wanted
    if gpus:
        if count > gpus:
            raise ConfigError(f"serve.replicas: {count} replicas but {gpus} GPU(s) are visible; "
                              f"use serve.replicas=all or at most {gpus}")
        return [f"cuda:{i}" for i in range(count)] if count > 1 or cfg.device == "auto" else [str(cfg.device)]
    return [str(cfg.device)] * count  # CPU (or one named device): N pipelines share it


def lora_stack(cfg: DictConfig) -> tuple[list[str], list[str], tuple[float, ...]]:
    """Keys, adapter names and configured scales of the preloaded LoRA stack, in fuse order."""
    stack = LoraStack.from_config(cfg.lora).entries
    return list(stack), [e.adapter_name for e in stack.values()], tuple(float(e.scale) for e in stack.values())


def default_deepcache(cfg: DictConfig) -> int:
    """The interval of requests that give none: ``serve.deepcache``, else the ``deepcache`` group's."""
    if cfg.serve.deepcache is not None:
        return int(cfg.serve.deepcache)
    return int(cfg.deepcache.cache_interval) if cfg.deepcache.enabled else 1


def encode_png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Replica:
    """One pipeline on one device; ``run`` is called from its worker thread only."""

    def __init__(self, cfg: DictConfig, device: str, index: int) -> None:
        self.cfg = copy.deepcopy(cfg)
        self.cfg.device = device
        self.name = f"replica{index}"
        self.device = device
        self.asm: Optional[Assembly] = None
        _, self.lora_names, self.lora_weights = lora_stack(cfg)
        self.on_lora_switch: Optional[Callable[[float], None]] = None
        self.weights_loaded_at: Optional[float] = None
        """Unix time the model weights were in memory (before LoRAs, compiling, graphs and warm-up)."""

    def load(self) -> Assembly:
        """Assemble with the run's stages; ``serve.batch_sizes`` become warm-up shapes, so every
        (shape, batch size) is compiled, saved to and loaded from the graph cache like the run's own."""
        sizes = sorted(set(self.cfg.serve.batch_sizes))
        if sizes:
            run = Settings.from_config(self.cfg)
            shapes = [(s.height, s.width) for s in self.cfg.warmup.shapes] or [(run.height, run.width)]
            self.cfg.warmup.shapes = [ShapeConfig(height=h, width=w, batch=b) for h, w in shapes for b in sizes]
        started = time.time()
        self.asm = assemble(self.cfg)
        self.weights_loaded_at = started + self.asm.report["load"]["seconds"]
        self.asm.pipe.set_progress_bar_config(disable=True)
        return self.asm

    def close(self) -> None:
        if self.asm is not None:
            self.asm.close()

    def _switch_loras(self, weights: tuple[float, ...]) -> None:
        if weights == self.lora_weights:
            return
        from ..lora import set_and_fuse_adapters

        start = time.perf_counter()
        chosen = [(n, w) for n, w in zip(self.lora_names, weights) if w != 0.0]
        set_and_fuse_adapters(self.asm.pipe, [n for n, _ in chosen], [w for _, w in chosen])
        self.lora_weights = weights
        if self.on_lora_switch:
            self.on_lora_switch(time.perf_counter() - start)

    def _deepcache(self, interval: int) -> None:
        from ..deep_cache import accept_cache_arguments, enabled

        pipe = self.asm.pipe
        if interval == 1 and enabled(pipe) is None:
            self.asm.call_kwargs.pop("cache_interval", None)  # the plain diffusers call
            return
        accept_cache_arguments(pipe)  # per request: the stage's settings, if any, stay the default
        self.asm.call_kwargs["cache_interval"] = interval

    def _batch_size(self, images: int) -> int:
        sizes = sorted(s for s in self.cfg.serve.batch_sizes if s >= images)
        return sizes[0] if sizes else images

    def run(self, jobs: list[Job]) -> list[list[bytes]]:
        """One pipeline call for every image of ``jobs`` (which share a ``BatchKey``); PNGs per job."""
        key: BatchKey = jobs[0].key
        self._switch_loras(key.loras)
        self._deepcache(key.deepcache)
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        negatives = [job.negative_prompt or "" for job in jobs for _ in job.seeds]
        seeds = [seed for job in jobs for seed in job.seeds]
        pad = self._batch_size(len(seeds)) - len(seeds)  # padded images are computed and dropped
        prompts, negatives, seeds = prompts + prompts[:1] * pad, negatives + negatives[:1] * pad, seeds + seeds[:1] * pad
        streaming = [job for job in jobs if job.progress is not None]

        def on_step(done: int) -> None:
            for job in streaming:
                job.step(done)

        settings = Settings(height=key.height, width=key.width, steps=key.steps, guidance=key.guidance,
                            seeds=seeds, prompts=prompts, negative_prompts=negatives if key.negative else None,
                            on_step=on_step if streaming else None)
        images = generate(self.asm, settings).images
        out, at = [], 0
        for job in jobs:
            out.append([encode_png(image) for image in images[at:at + job.images]])
            at += job.images
        return out
