"""Calibration: each quantized layer's input range, measured once on the user's own model and kept.

Dynamic 8-bit modes compute every activation row's scale on every call, which turns the kernel
that produces the activation into a reduction that reads its output twice: on SDXL that cost more
than the fp8 matmuls saved. A static scale, fixed ahead of time from the ranges a few real calls
produce, leaves the producer a multiply and a cast that Inductor fuses into it. This module records
those ranges (the absolute maximum of each layer's input over a few prompts and steps, fixed seeds,
so the same model gives the same ranges) and files them as safetensors beside the graph cache,
under a key of the weights, the mode and the calibration settings: a restart loads them instead of
calibrating again, and other weights (another checkpoint, a fused LoRA) never reuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..bounded import parse_json
from ..errors import ConfigError

PROMPTS = (
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a harbour at dawn, soft light",
    "close-up portrait of an old fisherman, dramatic lighting, 85mm",
    "isometric illustration of a tiny cozy library, pastel colors",
    "a neon-lit street in the rain at night, cinematic",
    "macro photograph of a dew-covered leaf, bokeh",
    "a bowl of ramen on a wooden table, studio photo",
    "an ancient stone castle on a cliff above a stormy sea",
)
"""Prompts calibration runs (the first ``prompts`` of them): varied subjects and styles, fixed, so
calibration of the same weights is repeatable."""

FORMAT = 1

MAX_LAYERS_BYTES = 16 << 20
"""The layer names a calibration file lists: read through the bounded reader like every outside JSON."""


@dataclass(frozen=True)
class Ranges:
    """Absolute maxima of each layer's input (qualified layer name -> float), and what they were measured on."""

    amax: Mapping[str, float]
    ndim: Mapping[str, int]
    """Each layer's input rank: torchao's static scale tensor must have the input's number of dimensions."""
    key: str
    sqnr_db: Mapping[str, float] = field(default_factory=dict)
    """Each quantized layer's signal-to-quantization-noise ratio on rows of its calibration input
    (filled after quantizing, saved with the ranges): what a user with real weights checks first."""
    samples: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    """A few rows of each layer's first calibration input, kept in memory only (for ``sqnr_db``)."""
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Each layer's first calibration input shape: where ``gain`` times its 16-bit and 8-bit forms."""
    speedup: Mapping[str, float] = field(default_factory=dict)
    """Each layer's 16-bit time over its 8-bit time at that shape, on ``speedup_device`` (saved)."""
    speedup_device: str = ""

    def scale(self, name: str, dtype_max: float) -> float:
        """The static scale that maps this layer's range onto the 8-bit type's (amax -> ``dtype_max``)."""
        return max(self.amax[name], 1e-12) / dtype_max


def weights_digest(modules: Mapping[str, nn.Module], samples: int = 64) -> str:
    """A digest of the layers' weights: shapes and a strided sample of each, cheap on any model size.

    Two checkpoints of one architecture differ in every weight, and a fused LoRA moves every layer
    it targets, so a sample of each weight tells them apart without hashing gigabytes.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        weight = modules[name].weight.detach()
        flat = weight.reshape(-1)
        step = max(1, flat.numel() // samples)
        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype}".encode())
        digest.update(flat[::step][:samples].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def calibration_key(modules: Mapping[str, nn.Module], mode: str, prompts: int, steps: int,
                    height: int, width: int) -> str:
    """What ranges depend on: the weights, the mode (which layers), the prompts, steps and size."""
    text = json.dumps({"format": FORMAT, "weights": weights_digest(modules), "mode": mode, "prompts": prompts,
                       "steps": steps, "size": [height, width]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@contextmanager
def observe_inputs(modules: Mapping[str, nn.Module]) -> Iterator[tuple[dict[str, torch.Tensor],
                                                                        dict[str, tuple[int, ...]],
                                                                        dict[str, torch.Tensor]]]:
    """While open, each module's input absolute maximum (float32, on its device), the shape and a few
    rows of its first input are kept.

    The running maxima stay on the device (no synchronisation per layer call) until read.
    """
    seen: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    rows: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            amax = args[0].detach().abs().amax().float()
            seen[name] = amax if name not in seen else torch.maximum(seen[name], amax)
            if name not in rows:
                shapes[name] = tuple(args[0].shape)
                rows[name] = sample_rows(args[0].detach())

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        yield seen, shapes, rows
    finally:
        for handle in handles:
            handle.remove()


SAMPLE_ROWS = 16


def sample_rows(x: torch.Tensor) -> torch.Tensor:
    """``SAMPLE_ROWS`` evenly spaced rows (channel vectors) of a layer input: a linear's last dimension,
    a convolution's channel dimension (NCHW)."""
    flat = x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() == 4 else x.reshape(-1, x.shape[-1])
    index = torch.linspace(0, flat.shape[0] - 1, min(SAMPLE_ROWS, flat.shape[0]), device=flat.device).long()
    return flat[index].clone()


def as_input(rows: torch.Tensor, ndim: int) -> torch.Tensor:
    """Rows shaped back into an input of rank ``ndim`` for the layer (NCHW for a convolution: a column
    of pixels, which a 3x3 convolution's zero padding reads like any image's edge)."""
    if ndim == 4:
        return rows.t().reshape(1, rows.shape[1], rows.shape[0], 1)
    return rows.reshape(*([1] * (ndim - 2)), *rows.shape)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """``10 log10(|reference|^2 / |reference - test|^2)`` in float32; infinite when equal."""
    ref, out = reference.detach().float(), test.detach().float()
    noise = (ref - out).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.pow(2).sum().clamp_min(1e-30) / noise))


def record_ranges(modules: Mapping[str, nn.Module], run: Callable[[], None], key: str) -> Ranges:
    """Run ``run`` (the calibration calls) with observers on ``modules``; every module must have seen input."""
    with torch.no_grad(), observe_inputs(modules) as (seen, shapes, rows):
        run()
    missing = sorted(set(modules) - set(seen))
    if missing:
        raise RuntimeError(f"calibration: {len(missing)} layers saw no input (first: {missing[0]}); "
                           "they cannot get a static scale")
    return Ranges({name: float(value) for name, value in sorted(seen.items())},
                  {name: len(shape) for name, shape in sorted(shapes.items())}, key, samples=rows,
                  shapes=dict(sorted(shapes.items())))


def calibration_calls(pipe: Any, prompts: int, steps: int, height: int, width: int, seed: int = 0) -> Callable[[], None]:
    """The calls calibration observes: the first ``prompts`` of ``PROMPTS``, ``steps`` steps each, latents
    only (the VAE is not quantized), each prompt with its own fixed seed."""
    device = getattr(pipe, "device", torch.device("cpu"))

    def run() -> None:
        for i, prompt in enumerate(PROMPTS[:prompts]):
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            pipe(prompt=prompt, num_inference_steps=steps, height=height, width=width, generator=generator,
                 output_type="latent")
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def folder_beside(cache_dir: str) -> Path:
    """Where calibrations live: beside the graph cache, so a restart finds both."""
    return Path(cache_dir) / "calibration"


def path_for(folder: Path, key: str) -> Path:
    return Path(folder) / f"calibration-{key}.safetensors"


def save(ranges: Ranges, folder: Path) -> Path:
    """Write ``calibration-<key>.safetensors`` atomically (a reader never sees half a file)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = path_for(folder, ranges.key)
    names = list(ranges.amax)
    tensors = {"amax": torch.tensor([ranges.amax[n] for n in names], dtype=torch.float32),
               "ndim": torch.tensor([ranges.ndim[n] for n in names], dtype=torch.int32),
               "sqnr_db": torch.tensor([ranges.sqnr_db.get(n, float("nan")) for n in names], dtype=torch.float32),
               "speedup": torch.tensor([ranges.speedup.get(n, float("nan")) for n in names], dtype=torch.float32),
               "shape": torch.tensor([_padded(ranges.shapes.get(n, ())) for n in names], dtype=torch.int64).reshape(-1, MAX_RANK)}
    metadata = {"format": str(FORMAT), "key": ranges.key, "layers": json.dumps(names),
                "speedup_device": ranges.speedup_device}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".calibration-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


MAX_RANK = 4
"""Input shapes are saved padded to this rank (linear inputs have 2 or 3 dimensions, convolutions 4)."""


def _padded(shape: tuple[int, ...]) -> list[int]:
    return (list(shape) + [0] * MAX_RANK)[:MAX_RANK]


def load(folder: Path, key: str) -> Optional[Ranges]:
    """The ranges saved under ``key``, or ``None`` (none saved, or a file that is not a calibration of this key)."""
    from safetensors import safe_open

    path = path_for(folder, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            amax, ndim = f.get_tensor("amax"), f.get_tensor("ndim")
            sqnr = f.get_tensor("sqnr_db") if "sqnr_db" in f.keys() else torch.full_like(amax, float("nan"))
            speedup = f.get_tensor("speedup") if "speedup" in f.keys() else torch.full_like(amax, float("nan"))
            shape = f.get_tensor("shape") if "shape" in f.keys() else torch.zeros(len(amax), MAX_RANK, dtype=torch.int64)
        names = parse_json(metadata.get("layers", "[]"), f"{path} layers", list, max_bytes=MAX_LAYERS_BYTES)
    except Exception:  # unreadable or foreign: calibrate again rather than trust it
        return None
    if metadata.get("key") != key or metadata.get("format") != str(FORMAT) or not isinstance(names, list) \
            or amax.shape != (len(names),) or ndim.shape != (len(names),) or not torch.isfinite(amax).all() \
            or speedup.shape != (len(names),) or shape.shape != (len(names), MAX_RANK):
        return None
    return Ranges({str(n): float(v) for n, v in zip(names, amax.tolist())},
                  {str(n): int(d) for n, d in zip(names, ndim.tolist())}, key,
                  {str(n): float(v) for n, v in zip(names, sqnr.tolist()) if v == v},
                  shapes={str(n): tuple(d for d in dims if d > 0) for n, dims in zip(names, shape.tolist()) if dims[0] > 0},
                  speedup={str(n): float(v) for n, v in zip(names, speedup.tolist()) if v == v},
                  speedup_device=str(metadata.get("speedup_device", "")))


def default_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's own default image size (SDXL: 1024²), where calibration runs."""
    side = getattr(pipe, "default_sample_size", None) or 64
    return side * getattr(pipe, "vae_scale_factor", 8), side * getattr(pipe, "vae_scale_factor", 8)


def _text_to_image(pipe: Any) -> None:
    """Calibration makes its own calls from prompts alone; a pipeline that needs images cannot be driven so."""
    import inspect

    needs = [name for name, p in inspect.signature(pipe.__call__).parameters.items()
             if name in ("image", "control_image", "mask_image") and p.default is inspect.Parameter.empty]
    if needs or type(pipe).__name__.endswith(("ControlNetPipeline", "Img2ImgPipeline", "InpaintPipeline",
                                              "VideoDiffusionPipeline")):
        raise ConfigError(f"quantize.calibrate: {type(pipe).__name__} needs input images, which calibration does not "
                          "have; pass ranges measured on its text-to-image sibling (quantize_pipe(calibration=...)), "
                          "or use calibrate.prompts=0 (dynamic scales)")


def calibrated_ranges(pipe: Any, layers: Mapping[str, nn.Module], config: Any, calibration: Any) -> Ranges:
    """Ranges for ``layers``: given, loaded from the ``calibration`` folder under this model's key, or
    measured now (and saved there)."""
    if isinstance(calibration, Ranges):
        missing = sorted(set(layers) - set(calibration.amax))
        if missing:
            raise ConfigError(f"quantize_pipe: calibration has no range for {len(missing)} layers to quantize "
                              f"(first: {missing[0]}); calibrate this pipeline with the same quantize options")
        return calibration
    mode = getattr(config.mode, "value", config.mode)
    height, width = default_size(pipe)
    key = calibration_key(layers, mode, config.calibrate.prompts, config.calibrate.steps, height, width)
    folder = Path(calibration) if calibration is not None else None
    found = load(folder, key) if folder is not None else None
    timed = config.calibrate.min_speedup > 0  # timing needs each layer's input shape (older files lack them)
    if found is not None and set(layers) <= set(found.amax) and (not timed or set(layers) <= set(found.shapes)):
        return found
    _text_to_image(pipe)
    ranges = record_ranges(layers, calibration_calls(pipe, config.calibrate.prompts, config.calibrate.steps,
                                                     height, width), key)
    if folder is not None:
        save(ranges, folder)
    return ranges


def measure_sqnr(ranges: Ranges, layers: Mapping[str, nn.Module],
                 quantized_copy: Callable[[str, nn.Module], nn.Module]) -> Ranges:
    """The ranges with each layer's SQNR: its high-precision output against a quantized copy's, on the
    rows sampled from its own calibration input.

    One layer is copied and quantized at a time (``quantized_copy``: as it will be), so the figure
    is what quantizing this layer alone costs, measured before the model is changed: it can decide
    which layers to quantize. Layers without samples are left out.
    """
    found: dict[str, float] = dict(ranges.sqnr_db)
    with torch.no_grad():
        for name, module in layers.items():
            rows = ranges.samples.get(name)
            if rows is None:
                continue
            x = as_input(rows, ranges.ndim[name])
            quantized = quantized_copy(name, module)
            found[name] = sqnr_db(module(x), quantized(x))
            del quantized
    return replace(ranges, sqnr_db=found)


def keep(ranges: Ranges, calibration: Any) -> None:
    """Save ``ranges`` again where they came from, when that was a folder (now with their SQNR)."""
    if calibration is not None and not isinstance(calibration, Ranges):
        save(ranges, Path(calibration))
