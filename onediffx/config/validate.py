"""Range checks that types cannot express, run before anything loads.

Each failure names the key path, the bad value and what is allowed, so the one line the CLI
prints is enough to fix the config.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from .limits import SEED_MAX, problem, text_problem

DTYPES = ("float32", "float16", "bfloat16")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check(key: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    if value is not None and not ok(value):
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")


def _limited(key: str, value: Any) -> None:
    """A per-call value against its range in ``limits.LIMITS`` (by the key's last part)."""
    message = problem(key.rsplit(".", 1)[-1], value)
    if message:
        raise ConfigError(f"{key}: {message}")


def _sizes(cfg: DictConfig) -> Iterable[tuple[str, Any]]:
    for prefix, node in (("", cfg), ("model.", cfg.model)):
        yield prefix + "height", node.height
        yield prefix + "width", node.width
    for i, shape in enumerate(cfg.warmup.shapes):
        yield f"warmup.shapes[{i}].height", shape.height
        yield f"warmup.shapes[{i}].width", shape.width


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first out-of-range value in a composed run config."""
    type_lora_entries(cfg)
    _refuse_unknown_keys(cfg)
    for key, value in _sizes(cfg):
        _limited(key, value)
    for key in ("steps", "num_images", "repeat", "model.steps", "warmup.steps", "seed"):
        _limited(key, _select(cfg, key))
    for i, shape in enumerate(cfg.warmup.shapes):
        message = problem("num_images", shape.batch)
        if message:
            raise ConfigError(f"warmup.shapes[{i}].batch: {message}")
    last_seed = cfg.seed + cfg.num_images - 1
    _check("seed", cfg.seed, lambda v: last_seed <= SEED_MAX,
           "a seed with seed + num_images - 1 <= 2^63-1 (image i uses seed + i)")
    _check("warmup.runs", cfg.warmup.runs, lambda v: 0 <= v <= 100, "an integer from 0 to 100")
    for key in ("guidance", "model.guidance"):
        _limited(key, _select(cfg, key))
    for key in ("prompt", "negative_prompt"):
        message = text_problem(cfg[key], required=key == "prompt")
        if message:
            raise ConfigError(f"{key}: {message}")
    for i, entry in cfg.lora.items():
        _limited(f"lora.{i}.scale", entry.scale)
    _check("dtype", cfg.dtype, lambda v: v == "auto" or v in DTYPES, f"auto or one of {', '.join(DTYPES)}")
    _check("model.dtype", cfg.model.dtype, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
    _check("device", cfg.device, lambda v: bool(DEVICE_RE.match(v)), "auto, cpu, cuda, cuda:N or mps")
    # sweeps, batch prompts and launches
    _check("sweep.gpus", cfg.sweep.gpus, lambda v: v >= 0, "null or an integer >= 0 (0: no GPU pinning)")
    if cfg.resume and not cfg.prompts:
        raise ConfigError("resume: only batch runs resume; set prompts=<file.jsonl> or drop resume=true")
    if cfg.model.synthetic and cfg.model.builtin:
        raise ConfigError(f"model.synthetic: built-in model {cfg.model.builtin!r} has its own weights; drop one of the two")
    from ..instantid.config import check_face

    check_face(cfg)  # InstantID's face files, read before any weights load


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _unknown_keys(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """Keys a structured config node holds that its dataclass does not declare (``+typo=1``)."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        full = f"{path}{key}"
        if declared is not None and key not in declared:
            yield full, schema.__name__
            continue
        yield from _unknown_keys(node._get_node(key), f"{full}.")  # maps of dataclasses (lora) too


def _refuse_unknown_keys(cfg: DictConfig) -> None:
    for key, schema in _unknown_keys(cfg, ""):
        raise ConfigError(
            f"{key}: not a key of the {schema} config; check its spelling "
            f"(`onediffx run --cfg job` prints every key), or put a plugin's options under plugin_options"
        )


def type_lora_entries(cfg: DictConfig) -> None:
    """Each ``lora.<name>`` as a ``LoraEntry`` (defaults filled, types and keys checked), in place."""
    from omegaconf.errors import OmegaConfBaseException

    from .schema import LoraEntry

    for name in list(cfg.lora.keys()):
        entry = cfg.lora._get_node(name)
        if isinstance(entry, DictConfig) and OmegaConf.get_type(entry) is LoraEntry:
            continue
        if not isinstance(entry, DictConfig):
            raise ConfigError(f"lora.{name}: expected a mapping with at least `source`, got {entry!r}")
        try:
            typed = OmegaConf.merge(OmegaConf.structured(LoraEntry), entry)
            typed.source  # noqa: B018  (MISSING raises here)
        except OmegaConfBaseException as err:
            key = f"lora.{name}.{err.key}" if getattr(err, "key", None) else f"lora.{name}"
            message = str(err).splitlines()[0]
            if "Missing mandatory value" in message:
                message = "a LoRA needs `source` (a file, a folder or a Hub id in the local cache)"
            elif "Key '" in message and "not in" in message:
                message = f"not a key of a LoRA entry; keys: {', '.join(f.name for f in dataclasses.fields(LoraEntry))}"
            raise ConfigError(f"{key}: {message}") from None
        cfg.lora[name] = typed
