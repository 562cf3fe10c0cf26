"""LoRA loading and switching: diffusers/PEFT against onediffx, and the floor, in one process.

The LoRAs are generated for the given pipeline, at the ranks that give the requested file sizes,
so the benchmark runs on synthetic full-size models without downloads: for a UNet in kohya format
(SGM names for SDXL, fp16, alpha stored); for a transformer (FLUX.1, SD3.5) in diffusers format
(``transformer.*.lora_A``, the transformer's dtype, alpha = rank), as ai-toolkit and diffusers'
trainers publish them and the one format both pipelines' diffusers loaders read. Every path is timed from a file on disk to fused weights on
the device; between paths the pipeline's weights are put back bit-exactly, so each one starts from
the same state. The floor is what no loader can beat with safetensors' reader: reading the file
onto the device with ``load_file`` and adding each layer's update in place with one ``addmm_``.
onediffx's loads and the floor take ~0.1 s: each is the median of ``REPEAT`` runs, each run
started from a collected heap; diffusers' load+fuse runs once.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..lora import api as onediffx_lora
from .measure import seconds as _measure_seconds
from ..lora.fit import lora_components
from ..lora.formats import TargetKey, to_canonical
from ..lora.sources import clear_cache, read_lora
from ..lora.synthetic import bytes_per_rank, lora_targets, random_lora, save_published

MiB = 2**20
SAMPLES = 16
"""Layers whose fused values are compared between diffusers and onediffx (all would double memory)."""
REPEAT = 3
"""Timed runs of onediffx's loads and of the floor per file (each ~0.1 s; rows give the median).
diffusers' load+fuse (~2 s) runs once."""


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of one call, started from a freshly collected heap.

    A full garbage collection of a process holding diffusers and SDXL takes 0.1-0.2 s, about one
    load in twenty triggers one, and whichever path it lands in has nothing to do with it.
    """
    gc.collect()
    return _measure_seconds(fn, device)


def _median_seconds(fn: Callable[[], Any], reset: Callable[[], Any], device: torch.device) -> float:
    """Median of ``REPEAT`` timed calls of ``fn``, with ``reset()`` (untimed) after each."""
    times = []
    for _ in range(REPEAT):
        times.append(_seconds(fn, device))
        reset()
    return statistics.median(times)


def _bench_targets(pipe: Any) -> Dict[TargetKey, torch.nn.Module]:
    """What trainers target by default: UNet transformer blocks or the transformer's blocks, and CLIP attention/MLP."""
    return {k: m for k, m in lora_targets(pipe, conv=False).items() if k[0] != "unet" or "attentions." in k[1]}


def _generate(pipe: Any, sizes_mb: Sequence[float], folder: Path) -> List[Tuple[Path, int]]:
    targets = _bench_targets(pipe)
    components = lora_components(pipe)
    transformer = components.get("transformer") if "unet" not in components else None
    dtype = next(transformer.parameters()).dtype if transformer is not None else torch.float16
    alpha = None if transformer is not None else (lambda key, r: r / 2)  # SD3's loader reads no alphas
    per_rank = bytes_per_rank(targets, dtype)
    files = []
    for i, size in enumerate(sizes_mb):
        rank = max(1, round(size * MiB / per_rank))
        path = save_published(pipe, random_lora(targets, rank, seed=100 + i, alpha=alpha),
                              folder / f"lora{i + 1}_r{rank}.safetensors", dtype=dtype)
        files.append((path, rank))
    return files


class _Weights:
    """Bit-exact snapshot of the weights LoRAs touch, to start every timed path from the same W0."""

    def __init__(self, pipe: Any):
        components = lora_components(pipe)
        self.params = {k: components[k[0]].get_submodule(k[1]).weight for k in _bench_targets(pipe)}
        self.saved = {k: p.detach().clone() for k, p in self.params.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for key, param in self.params.items():
                param.copy_(self.saved[key])

    def sample(self) -> Dict[TargetKey, torch.Tensor]:
        return {k: self.params[k].detach().float().clone() for k in list(self.params)[:SAMPLES]}


def _floor_plan(pipe: Any, path: Path, device: torch.device) -> List[Tuple[torch.nn.Parameter, str, str, float]]:
    """(weight, down key, up key, scale) per layer, worked out once outside the timing."""
    raw = read_lora(path, torch.device("cpu"))
    key_of = {id(v): k for k, v in raw.state_dict.items()}
    components = lora_components(pipe)
    layers = to_canonical(raw, components, getattr(components.get("unet"), "config", None), type(pipe))
    return [(components[c].get_submodule(m).weight, key_of[id(layer.down)], key_of[id(layer.up)], layer.scale)
            for (c, m), layer in layers.items()]


def _floor(plan: List[Tuple[torch.nn.Parameter, str, str, float]], path: Path, device: torch.device) -> None:
    from safetensors.torch import load_file

    state_dict = load_file(str(path), device=str(device))
    with torch.no_grad():
        for param, down, up, scale in plan:
            d, u = state_dict[down].to(param.dtype), state_dict[up].to(param.dtype)  # no-op for fp16 models
            param.data.view(param.shape[0], -1).addmm_(u.view(param.shape[0], -1), d.view(d.shape[0], -1),
                                                       alpha=scale)


def _fused_components(pipe: Any) -> List[str]:
    """Every component diffusers loads LoRAs into, as onediffx fuses them all: FLUX's ``fuse_lora()``
    fuses only the transformer unless told (SD/SDXL's default is already all of them)."""
    return list(pipe._lora_loadable_modules)


def _diffusers_load_fuse(pipe: Any, path: Path, name: str, device: torch.device) -> Tuple[float, float]:
    load = _seconds(lambda: pipe.load_lora_weights(str(path), adapter_name=name), device)
    fuse = _seconds(lambda: pipe.fuse_lora(components=_fused_components(pipe), adapter_names=[name]), device)
    return load, fuse


def _onediffx_load_fuse(pipe: Any, path: Path, name: str, offload: str) -> None:
    weight = "weight" if offload != "cpu" else "lora"
    onediffx_lora.load_and_fuse_lora(pipe, str(path), name, offload_device=offload, offload_weight=weight)


def _max_diff(a: Dict[TargetKey, torch.Tensor], b: Dict[TargetKey, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _warm_up(pipe: Any, path: Path, device: torch.device, weights: _Weights) -> None:
    """First calls pay for CUDA/cuBLAS set-up and imports; no path should be charged for that."""
    _diffusers_load_fuse(pipe, path, "warmup", device)
    pipe.unload_lora_weights()
    weights.restore()
    for offload in {device.type, "cpu"}:
        _onediffx_load_fuse(pipe, path, "warmup", offload)
        onediffx_lora.delete_adapters(pipe)
    _floor(_floor_plan(pipe, path, device), path, device)
    weights.restore()


def run_lora_bench(pipe: Any, device: Union[str, torch.device], sizes_mb: Sequence[float] = (12, 23, 28, 55, 270),
                   tmp_dir: Optional[Union[str, Path]] = None) -> List[Dict[str, Any]]:
    """Time LoRA loading (per size) and switching ([1], [1,2], ... all), one row per measurement.

    ``pipe`` must support diffusers' LoRA loading (SD/SDXL, FLUX.1, SD3.5); it is left with its weights as found.
    """
    device = torch.device(device)
    with tempfile.TemporaryDirectory(dir=tmp_dir) as folder:
        files = _generate(pipe, sizes_mb, Path(folder))
        weights = _Weights(pipe)
        _warm_up(pipe, files[0][0], device, weights)
        rows = [_load_row(pipe, i, path, rank, device, weights) for i, (path, rank) in enumerate(files)]
        rows += _switch_rows(pipe, [p for p, _ in files], device, weights)
    weights.restore()
    return rows


def _load_row(pipe: Any, i: int, path: Path, rank: int, device: torch.device, weights: _Weights) -> Dict[str, Any]:
    name = f"lora{i + 1}"
    d_load, d_fuse = _diffusers_load_fuse(pipe, path, name, device)
    pipe.unload_lora_weights()  # keeps the fused values in the plain modules
    reference = weights.sample()
    weights.restore()

    _onediffx_load_fuse(pipe, path, name, device.type)
    diff = _max_diff(weights.sample(), reference)
    onediffx_lora.unfuse_lora(pipe)
    exact = all(torch.equal(weights.params[k], weights.saved[k]) for k in weights.params)
    onediffx_lora.delete_adapters(pipe)

    def reset() -> None:
        onediffx_lora.delete_adapters(pipe)
        weights.restore()

    fast = _median_seconds(lambda: _onediffx_load_fuse(pipe, path, name, device.type), reset, device)
    default = _median_seconds(lambda: _onediffx_load_fuse(pipe, path, name, "cpu"), reset, device)
    plan = _floor_plan(pipe, path, device)
    floor = _median_seconds(lambda: _floor(plan, path, device), weights.restore, device)
    return {
        "kind": "load", "lora": name, "file_mb": round(path.stat().st_size / MiB, 2), "rank": rank,
        "layers": len(plan), "diffusers_load_s": d_load, "diffusers_load_fuse_s": d_load + d_fuse,
        "onediffx_load_fuse_s": fast, "onediffx_load_fuse_cpu_offload_s": default, "floor_s": floor,
        "speedup_vs_diffusers": (d_load + d_fuse) / fast, "x_floor": fast / floor,
        "max_abs_diff_vs_diffusers": diff, "unfuse_bit_exact": exact,
    }


def _switch_rows(pipe: Any, files: List[Path], device: torch.device, weights: _Weights) -> List[Dict[str, Any]]:
    names = [f"lora{i + 1}" for i in range(len(files))]
    for name, path in zip(names, files):
        pipe.load_lora_weights(str(path), adapter_name=name)
    peft = []
    for k in range(1, len(names) + 1):
        chosen = names[:k]
        peft.append(_seconds(lambda: (pipe.set_adapters(chosen, [1.0] * k),
                                      pipe.fuse_lora(components=_fused_components(pipe), adapter_names=chosen)),
                             device))
        pipe.unfuse_lora()
    pipe.unload_lora_weights()
    weights.restore()

    for name, path in zip(names, files):
        onediffx_lora.load_lora_and_optionally_fuse(pipe, str(path), name, fuse=False, use_cache=True,
                                                    offload_device=device.type, offload_weight="weight")
    ours = [_seconds(lambda: onediffx_lora.set_and_fuse_adapters(pipe, names[:k], [1.0] * k), device)
            for k in range(1, len(names) + 1)]
    onediffx_lora.delete_adapters(pipe)
    clear_cache()
    weights.restore()
    return [{"kind": "switch", "adapters": f"1..{k}" if k > 1 else "1", "peft_set_adapters_fuse_s": p,
             "onediffx_set_and_fuse_s": o, "speedup": p / o}
            for k, (p, o) in enumerate(zip(peft, ours), start=1)]
