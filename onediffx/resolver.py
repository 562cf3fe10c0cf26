"""Assemble a ready pipeline from a composed config: plugins, checks, load, stages in order.

Everything that can be checked without weights is checked first (stage names, each stage's
options), so a bad config fails in a fraction of a second rather than after a model load.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Sequence

from omegaconf import DictConfig

from . import stages as _builtin_stages  # noqa: F401  (registers the built-in stages)
from .compile.backends import resolve_backend
from .compile import preload as compiler_preload
from .config import validate
from .device import check_memory, resolve_device, resolve_dtype, synchronize
from .generate import Settings
from .models.loader import load_pipeline
from .plugin_loader import load_plugins
from .registry import get_stage
from .stages.base import Assembly, Stage, check_order, read_options


class Planned(NamedTuple):
    """One stage of the plan and its options, typed and validated."""

    stage: Stage
    options: Any


def plan(cfg: DictConfig) -> list[Planned]:
    """The stages ``cfg.stages`` names, in an order their ``after``/``before`` allow, each with its
    options converted and validated once and its own checks passed."""
    validate(cfg)
    load_plugins(cfg.plugins)
    stages = [get_stage(name, key=f"stages[{i}]")() for i, name in enumerate(cfg.stages)]
    check_order(stages)
    planned = [Planned(stage, read_options(stage, cfg)) for stage in stages]
    for stage, options in planned:
        stage.check(options, cfg)
    return planned


def _compiles(cfg: DictConfig, device) -> bool:
    return resolve_backend(cfg.compile.backend, device) == "inductor"


def _call_shapes(cfg: DictConfig) -> list[tuple[int, int, int]]:
    """(height, width, images per call) of the run's own calls and of each warm-up shape."""
    run = Settings.from_config(cfg)
    shapes = [(run.height, run.width, cfg.num_images)]
    return shapes + [(s.height, s.width, s.batch) for s in cfg.warmup.shapes]


def assemble(cfg: DictConfig, call_shapes: Sequence[tuple[int, int, int]] = ()) -> Assembly:
    """Load the model and apply every enabled stage; times go to ``asm.report``.

    ``call_shapes`` (height, width, images) are calls the caller will make besides the run's own
    (a prompts file's lines): each is checked against the device's memory before anything loads.
    """
    planned = plan(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, cfg.model.dtype, device)
    for height, width, images in {*_call_shapes(cfg), *call_shapes}:
        check_memory(device, dtype, height, width, images)
    start = time.perf_counter()
    names = tuple(stage.name for stage, _ in planned)
    if "compile" in names and _compiles(cfg, device):
        compiler_preload.start()
    pipe = load_pipeline(cfg.model, device, dtype)
    compiler_preload.wait()  # the load's time includes any wait, so no stage looks faster than it is
    asm = Assembly(pipe=pipe, cfg=cfg, device=device, dtype=dtype, stages=names)
    asm.note("load", seconds=time.perf_counter() - start)
    for stage, options in planned:
        if not stage.enabled(asm, options):
            asm.note(stage.name, enabled=False)
            continue
        start = time.perf_counter()
        stage.apply(asm, options)
        synchronize(device)
        asm.note(stage.name, enabled=True, seconds=time.perf_counter() - start)
    return asm
