"""Range checks that types cannot express, run before anything loads.

Each failure names the key path, the bad value and what is allowed, so the one line the CLI
prints is enough to fix the config.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from omegaconf import DictConfig

from ..errors import ConfigError

DTYPES = ("float32", "float16", "bfloat16")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check(key: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    if value is not None and not ok(value):
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")


def _positive(key: str, value: Any) -> None:
    _check(key, value, lambda v: v > 0, "a positive integer")


def _size(key: str, value: Any) -> None:
    _check(key, value, lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8")


def _sizes(cfg: DictConfig) -> Iterable[tuple[str, Any]]:
    for prefix, node in (("", cfg), ("model.", cfg.model)):
        yield prefix + "height", node.height
        yield prefix + "width", node.width
    for i, shape in enumerate(cfg.warmup.shapes):
        yield f"warmup.shapes[{i}].height", shape.height
        yield f"warmup.shapes[{i}].width", shape.width


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first out-of-range value in a composed run config."""
    for key, value in _sizes(cfg):
        _size(key, value)
    for key in ("steps", "num_images", "repeat", "model.steps", "warmup.steps"):
        _positive(key, _select(cfg, key))
    _check("warmup.runs", cfg.warmup.runs, lambda v: v >= 0, "an integer >= 0")
    for key in ("guidance", "model.guidance"):
        _check(key, _select(cfg, key), lambda v: v >= 0, "a number >= 0")
    for i, entry in cfg.lora.items():
        _check(f"lora.{i}.scale", entry.scale, lambda v: -100 <= v <= 100, "a number between -100 and 100")
    _check("dtype", cfg.dtype, lambda v: v == "auto" or v in DTYPES, f"auto or one of {', '.join(DTYPES)}")
    _check("model.dtype", cfg.model.dtype, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
    _check("device", cfg.device, lambda v: bool(DEVICE_RE.match(v)), "auto, cpu, cuda, cuda:N or mps")
    # sweeps, batch prompts and launches
    _check("sweep.gpus", cfg.sweep.gpus, lambda v: v >= 0, "null or an integer >= 0 (0: no GPU pinning)")
    if cfg.resume and not cfg.prompts:
        raise ConfigError("resume: only batch runs resume; set prompts=<file.jsonl> or drop resume=true")
    if cfg.model.synthetic and cfg.model.builtin:
        raise ConfigError(f"model.synthetic: built-in model {cfg.model.builtin!r} has its own weights; drop one of the two")


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node
