"""``quantize_pipe``: open fp8/int8 quantization of a diffusers pipeline's heavy components, via torchao.

    pipe = quantize_pipe(pipe, mode="fp8")    # UNet linear layers: fp8 weights and activations
    pipe = compile_pipe(pipe)                  # Inductor fuses the scaling into the matmuls

Quantization comes before compiling (graphs are traced over the quantized weights) and before
LoRA fusing (which then works from the kept high-precision originals: see ``quantized_weights``). torchao
does the arithmetic; this module chooses the layers (``select``), checks the device (``modes``)
and records what it did, for metrics, the graph cache's key and LoRA.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, fields, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..device import device_name
from ..errors import ConfigError, NotAvailableError
from ..fused_qkv import fuse_qkv, projections, share_rows
from ..quantized_weights import QuantizedWeight, register
from ..state import LORA, QUANTIZE
from .calibrate import calibrated_ranges, keep, measure_sqnr
from .attention8 import apply_attention8
from .attention8 import kernels_available as attention_kernels
from .conv8 import FP8, QMAX, Conv8, Conv8Config, is_spatial_conv
from .conv8 import kernels_available as conv_kernels
from .config import KeepOriginals, QuantizeConfig, QuantizeMode
from .gain import measure_speedups
from .modes import DTYPE_MAX, check_supported, needed_dtype, static_config, torchao_config
from .select import PointwiseConv, Selection, is_pointwise_conv, select

log = logging.getLogger("onediffx.quantize")

@dataclass
class QuantizeState:
    """What ``quantize_pipe`` did to a pipeline, kept in its ``state.QUANTIZE`` slot."""

    config: QuantizeConfig
    layers: list[str] = field(default_factory=list)
    """Qualified names (``unet.down_blocks.1...to_qkv``) of the quantized layers."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Linear layers left in high precision, with the reason."""
    records: list[QuantizedWeight] = field(default_factory=list, repr=False)
    """One per quantized weight (how it was made, its original): what LoRA fusing re-quantizes with."""
    dtype_from: Optional[str] = None
    """The pipeline's dtype before quantizing, when the mode needed another (fp8: bfloat16)."""
    dtype: str = ""
    calibration: Optional[str] = None
    """Key of the calibrated ranges behind static activation scales (``None``: dynamic scales)."""
    sqnr_db: dict[str, float] = field(default_factory=dict)
    attention8: list[str] = field(default_factory=list)
    """Self-attentions computing in fp8 (``quantize.attention``)."""
    speedup: dict[str, float] = field(default_factory=dict)
    """Each timed layer's 16-bit over 8-bit time on this card (``calibrate.min_speedup``)."""
    """Each quantized layer's SQNR on rows of its calibration input (calibrated modes)."""
    seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0

    def facts(self) -> dict[str, Any]:
        """The state as metrics.json reports it."""
        reasons: dict[str, int] = {}
        for why in self.skipped.values():
            reasons[why.split(" (")[0]] = reasons.get(why.split(" (")[0], 0) + 1
        return {
            "mode": QuantizeMode(self.config.mode).value, "components": list(self.config.components),
            "layers": len(self.layers), "quantized_layers": list(self.layers), "skipped": reasons,
            "dtype": self.dtype, "dtype_changed_from": self.dtype_from,
            "dtype_note": (f"{QuantizeMode(self.config.mode).value} needs {self.dtype} weights (torchao's fp8 "
                           f"kernels); the pipeline was converted from {self.dtype_from}") if self.dtype_from else None,
            "weight_mib_before": round(self.bytes_before / 2**20, 1), "weight_mib_after": round(self.bytes_after / 2**20, 1),
            "conv_1x1": self.config.conv_1x1, "keep_originals": KeepOriginals(self.config.keep_originals).value,
            "quantize_seconds": round(self.seconds, 3), "calibration": self.calibration, "attention8": len(self.attention8),
            **_ranked(self.sqnr_db, "sqnr_db", 2), **_ranked(self.speedup, "speedup", 3),
        }

    def cache_key(self, component: str) -> Optional[dict[str, Any]]:
        """This state's part of the graph cache's key of ``component`` (``None``: not quantized there).

        Graphs traced over quantized weights differ from unquantized ones in their inputs and kernels,
        and differ again with the set of quantized layers: a cache made otherwise is a miss.
        """
        top = component.split(".")[0]
        layers = [n for n in self.layers if n.split(".")[0] == top]
        if not layers:
            return None
        return {"mode": QuantizeMode(self.config.mode).value, "conv_1x1": self.config.conv_1x1,
                "layers": hashlib.sha256("\n".join(layers).encode()).hexdigest()[:16], "count": len(layers),
                "torchao": torchao_version(), "recipe": self.recipe(),
                **({"attention8": len([n for n in self.attention8 if n.split(".")[0] == top])} if self.attention8 else {}),
                **({"calibration": self.calibration} if self.calibration else {})}

    def recipe(self) -> Optional[str]:
        """A digest of the torchao config (its activation bounds, granularity): the graphs trace its ops."""
        return hashlib.sha256(repr(self.records[0].config).encode()).hexdigest()[:16] if self.records else None


def _ranked(values: dict[str, float], key: str, digits: int) -> dict[str, Any]:
    """Per-layer figures for metrics.json, the lowest first (the layers to look at lead): ``<key>_min``,
    ``<key>_median`` and ``layer_<key>``."""
    if not values:
        return {}
    ordered = sorted(values.items(), key=lambda item: item[1])
    return {f"{key}_min": round(ordered[0][1], digits), f"{key}_median": round(ordered[len(ordered) // 2][1], digits),
            f"layer_{key}": {name: round(value, digits) for name, value in ordered}}


def quantize_state(pipe: Any) -> Optional[QuantizeState]:
    """What ``quantize_pipe`` did to ``pipe`` (``None``: not quantized)."""
    return QUANTIZE.get(pipe)


def options_of(mode: Any = None, options: Optional[QuantizeConfig] = None, **overrides: Any) -> QuantizeConfig:
    """A ``QuantizeConfig`` from ``options`` (or the defaults), ``mode`` and keyword overrides."""
    config = options if options is not None else QuantizeConfig()
    known = {f.name for f in fields(QuantizeConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"quantize_pipe: unexpected option(s) {', '.join(unknown)}; options: {', '.join(sorted(known))}")
    if mode is not None:
        try:
            overrides["mode"] = QuantizeMode(getattr(mode, "value", mode))
        except ValueError:
            raise ConfigError(f"quantize.mode: {mode!r} is not one of {', '.join(m.value for m in QuantizeMode)}") from None
    for key, enum in (("keep_originals", KeepOriginals),):
        if key in overrides:
            overrides[key] = enum(getattr(overrides[key], "value", overrides[key]))
    config = replace(config, **overrides)
    config.validate()
    return config


def component_paths(pipe: Any, components: list[str]) -> list[str]:
    """``components`` with ``denoiser`` named as what ``pipe`` holds (``unet`` or ``transformer``), once each."""
    from ..denoiser import denoiser_name

    named = [denoiser_name(pipe) if path == "denoiser" else path for path in components]
    return list(dict.fromkeys(path for path in named if path))


def find_module(pipe: Any, path: str) -> Optional[nn.Module]:
    obj = pipe
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _device_dtype(pipe: Any, modules: list[nn.Module]) -> tuple[torch.device, torch.dtype]:
    param = next(modules[0].parameters())
    return param.device, param.dtype


def _weight_bytes(modules: list[nn.Module]) -> int:
    """Bytes of weight memory on the components' device, each block once: the separate q/k/v
    projections are rows of a fused copy (or, quantized, of its original, on the CPU by default)."""
    from ..quantized_weights import inner_tensors

    device = next(modules[0].parameters()).device
    blocks: dict[int, int] = {}
    for module in modules:
        for param in module.parameters():
            for t in inner_tensors(param) or [param]:
                if t.device == device:
                    blocks[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(blocks.values())


def _keep(weight: torch.Tensor, where: KeepOriginals) -> Optional[torch.Tensor]:
    if where == KeepOriginals.none:
        return None
    if where == KeepOriginals.device or weight.device.type == "cpu":
        return weight.detach()  # the tensor quantize_ replaces: holding it costs nothing more than keeping it
    host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    return host.copy_(weight.detach(), non_blocking=True)


def _swap_pointwise(component: nn.Module, prefix: str, chosen: set[str]) -> None:
    """Replace the chosen 1x1 convolutions of ``component`` by ``PointwiseConv`` (same weights)."""
    for path, module in list(component.named_modules()):
        name = f"{prefix}.{path}" if path else prefix
        if name in chosen and is_pointwise_conv(module):
            parent_path, _, leaf = path.rpartition(".")
            parent = component.get_submodule(parent_path) if parent_path else component
            setattr(parent, leaf, PointwiseConv.from_conv(module))


def _fused_parts(component: nn.Module, prefix: str, chosen: set[str]) -> dict[str, tuple[torch.Tensor, list[nn.Linear]]]:
    """For each chosen fused q/k/v copy: its high-precision weight (before torchao replaces it), its parts."""
    found = {}
    for path, module in component.named_modules():
        fused, parts = projections(module) if getattr(module, "fused_projections", False) else (None, [])
        name = f"{prefix}.{path}.{'to_kv' if len(parts) == 2 else 'to_qkv'}"
        if fused is not None and name in chosen:
            found[name] = (fused.weight.detach(), parts)
    return found


def _move_parts(fused_parts: dict[str, tuple[torch.Tensor, list[nn.Linear]]], by_name: dict[str, nn.Module],
                originals: dict[str, Optional[torch.Tensor]]) -> None:
    """Give the separate projections of each quantized fused copy the copy's high-precision original.

    They are what LoRA files name and fuse into, the source the copy is re-quantized from, and no
    longer what the attention computes with. Sharing the kept original's memory (``keep_originals``:
    on the CPU by default) frees their device copies: 0.6 GiB on SDXL. Without a kept original
    (``none``) they move to the CPU.
    """
    for name, (high, parts) in fused_parts.items():
        if not hasattr(by_name[name].weight, "tensor_data_names"):
            continue  # torchao left it in high precision: the parts keep sharing its rows
        original = originals[name]
        share_rows(by_name[name], parts, high.to("cpu") if original is None else original)


def quantize_pipe(pipe: Any, mode: Any = None, options: Optional[QuantizeConfig] = None,
                  calibration: Any = None, **overrides: Any) -> Any:
    """Quantize the linear layers of the pipeline's ``components`` in place and return the pipeline.

    ``mode``: ``fp8`` (compute capability >= 8.9), ``int8`` (Ampere, CPUs), ``fp8_weight_only``,
    ``int8_weight_only``, or ``off``; ``None`` takes ``options.mode``, or ``fp8`` without ``options``.
    ``options`` is a ``QuantizeConfig``; keyword overrides set its fields (``components=["unet",
    "controlnet"]``, ``exclude=["*attn2*"]``, ``min_features=64``, ``conv_1x1=True``, ``fuse_qkv=False``,
    ``keep_originals="none"``, ``calibrate=CalibrateConfig(prompts=4)``). Call it before ``compile_pipe``
    and before fusing LoRAs. fp8 converts the pipeline to bfloat16 (torchao's fp8 kernels take bfloat16).

    With ``calibrate.prompts > 0`` activations get static scales: ``calibration`` is a folder where the
    measured ranges are kept (loaded when this model was calibrated before, else measured and saved),
    a ``calibrate.Ranges`` measured earlier, or ``None`` (measured now, kept nowhere).
    """
    config = options_of(QuantizeMode.fp8 if mode is None and options is None else mode, options, **overrides)
    if not config.enabled:
        return pipe
    if quantize_state(pipe) is not None:
        raise ConfigError("quantize_pipe: this pipeline is quantized already; load it afresh to quantize it differently")
    lora = LORA.get(pipe)
    if lora is not None and (lora.fused or lora.adapters):  # loaded ones point at the weights quantizing replaces
        raise ConfigError("quantize_pipe: LoRAs are loaded into this pipeline; quantize first, then load them, or "
                          "delete_adapters() first (fusing into quantized weights works from their high-precision originals)")
    found = {path: m for path in component_paths(pipe, config.components) if (m := find_module(pipe, path)) is not None}
    if not found:
        raise ConfigError(f"quantize.components: none of {', '.join(config.components)} is in this "
                          f"{type(pipe).__name__}")
    start = time.perf_counter()
    device, dtype = _device_dtype(pipe, list(found.values()))
    check_supported(config.mode, device)
    for key, wanted, why_not in (("convs", config.convs, conv_kernels), ("attention", config.attention, attention_kernels)):
        missing = why_not(device) if wanted else None
        if missing:
            raise NotAvailableError(f"quantize.{key}: {missing}; or set quantize.{key}=false")
    torchao = torchao_config(config.mode)  # imports torchao (quietly) before anything changes
    state = QuantizeState(config=config, bytes_before=_weight_bytes(list(found.values())))
    target = needed_dtype(config.mode, dtype)
    if target != dtype:
        state.dtype_from = str(dtype).replace("torch.", "")
        pipe.to(dtype=target)
        log.warning("quantize=%s: converted the pipeline from %s to %s (torchao's fp8 kernels take bfloat16)",
                    QuantizeMode(config.mode).value, state.dtype_from, str(target).replace("torch.", ""))
    state.dtype = str(target).replace("torch.", "")
    prepared = {path: _prepare(component, path, config) for path, component in found.items()}
    ranges = _calibrate(pipe, prepared, config, calibration, device) if config.calibrate.enabled else None
    if ranges is not None:
        state.calibration, state.sqnr_db, state.speedup = ranges.key, dict(ranges.sqnr_db), dict(ranges.speedup)
        floor_db, floor_x = config.calibrate.min_sqnr_db, config.calibrate.min_speedup
        _drop_under(prepared, ranges.sqnr_db, floor_db, lambda v: f"SQNR {v:.1f} dB below calibrate.min_sqnr_db={floor_db:g}")
        _drop_under(prepared, ranges.speedup, floor_x,
                    lambda v: f"8 bits {v:.2f}x the 16-bit speed here, below calibrate.min_speedup={floor_x:g}")
    for path, component in found.items():
        chosen, by_name = prepared[path]
        configs = {name: torchao if ranges is None else _static(config, ranges, name, device) for name in chosen.chosen}
        _quantize_component(component, path, chosen, by_name, configs, config, target, state)
        _swap_convs(component, path, chosen, ranges, config, target, state)
        if config.attention:
            state.attention8 += [f"{path}.{name}" for name in apply_attention8(component)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the high-precision weights quantize_ replaced
    state.bytes_after = _weight_bytes(list(found.values()))
    state.seconds = time.perf_counter() - start
    QUANTIZE.set(pipe, state)
    log.info("quantize=%s: %d layers in %.2f s", QuantizeMode(config.mode).value, len(state.layers), state.seconds)
    return pipe


def _static(config: QuantizeConfig, ranges: Any, name: str, device: torch.device) -> Any:
    """torchao's static config for layer ``name`` from its calibrated range."""
    mode = QuantizeMode(config.mode)
    return static_config(mode, ranges.scale(name, DTYPE_MAX[mode]), ranges.ndim[name], device)


def _calibrate(pipe: Any, prepared: dict[str, tuple[Selection, dict[str, nn.Module]]], config: QuantizeConfig,
               calibration: Any, device: torch.device) -> Any:
    """The chosen layers' ranges (given, loaded or measured) and, measured with them, each layer's SQNR."""
    layers = {name: by_name[name] for chosen, by_name in prepared.values() for name in chosen.chosen + chosen.convs}
    ranges = calibrated_ranges(pipe, layers, config, calibration)
    if ranges.samples:  # measured now: each layer's SQNR, saved with the ranges for later starts
        measured = ranges
        ranges = measure_sqnr(measured, layers, lambda name, module: _quantized_copy(config, measured, name, module, device))
        keep(ranges, calibration)
    if config.calibrate.min_speedup > 0:
        ranges = _timed(ranges, layers, config, calibration, device)
    return ranges


def _timed(ranges: Any, layers: dict[str, nn.Module], config: QuantizeConfig, calibration: Any,
           device: torch.device) -> Any:
    """The ranges with each layer's measured speed-up on this card: saved ones when they are this
    card's, else measured now and saved (a restart then quantizes the same layers)."""
    card = device_name(device)
    wanted = {name for name in layers if name in ranges.shapes}
    if ranges.speedup_device == card and wanted <= set(ranges.speedup):
        return ranges
    speedup = measure_speedups(layers, ranges.shapes,
                               lambda name, module: _quantized_copy(config, ranges, name, module, device))
    ranges = replace(ranges, speedup=speedup, speedup_device=card)
    keep(ranges, calibration)
    return ranges


def _quantized_copy(config: QuantizeConfig, ranges: Any, name: str, module: nn.Module, device: torch.device) -> nn.Module:
    """Layer ``name`` quantized as it will be, leaving ``module`` itself untouched."""
    import copy

    from torchao.quantization import quantize_

    if is_spatial_conv(module):
        return _conv8(config, ranges, name, module)
    quantized = copy.deepcopy(module)
    quantize_(quantized, _static(config, ranges, name, device))
    return quantized


def _conv8(config: QuantizeConfig, ranges: Any, name: str, conv: nn.Module) -> Conv8:
    dtype = FP8 if QuantizeMode(config.mode) == QuantizeMode.fp8 else torch.int8
    return Conv8(conv, ranges.scale(name, QMAX[dtype]), dtype)


def _swap_convs(component: nn.Module, path: str, chosen: Selection, ranges: Any, config: QuantizeConfig,
                target: torch.dtype, state: QuantizeState) -> None:
    """Replace the chosen 3x3 convolutions by ``Conv8`` and record them (LoRA fusing then refuses them:
    their input scale is calibrated)."""
    for name in chosen.convs:
        relative = name[len(path) + 1:]
        parent_path, _, leaf = relative.rpartition(".")
        parent = component.get_submodule(parent_path) if parent_path else component
        conv = getattr(parent, leaf)
        original = _keep(conv.weight, KeepOriginals(config.keep_originals))
        replacement = _conv8(config, ranges, name, conv)
        setattr(parent, leaf, replacement)
        record = QuantizedWeight(name, Conv8Config(ranges.scale(name, QMAX[replacement.weight.dtype]),
                                                   replacement.weight.dtype), target, original)
        register(replacement.weight, record)
        state.records.append(record)
        state.layers.append(name)


def _drop_under(prepared: dict[str, tuple[Selection, dict[str, nn.Module]]], values: dict[str, float],
                floor: float, reason: Callable[[float], str]) -> None:
    """Leave in high precision every chosen layer whose figure is under ``floor`` (0: keep all),
    saying why with ``reason(figure)``."""
    if floor <= 0:
        return
    for chosen, _ in prepared.values():
        for name in chosen.chosen + chosen.convs:
            if values.get(name, float("inf")) < floor:
                chosen.drop({name}, reason(values[name]))


def _prepare(component: nn.Module, path: str, config: QuantizeConfig) -> tuple[Selection, dict[str, nn.Module]]:
    """Fuse q/k/v, choose the layers, turn chosen 1x1 convolutions into linears: the layers as they will
    run, which is what calibration must observe."""
    if config.fuse_qkv and hasattr(component, "fuse_qkv_projections"):
        fuse_qkv(component)
    chosen: Selection = select(component, path, config)
    _swap_pointwise(component, path, set(chosen.chosen))
    return chosen, {f"{path}.{p}" if p else path: m for p, m in component.named_modules()}


def _quantize_component(component: nn.Module, path: str, chosen: Selection, by_name: dict[str, nn.Module],
                        configs: dict[str, Any], config: QuantizeConfig, target: torch.dtype,
                        state: QuantizeState) -> None:
    """torchao's ``quantize_`` over the chosen layers, each with its own config; record what it made."""
    from collections import OrderedDict

    from torchao.quantization import FqnToConfig, quantize_

    names = set(chosen.chosen)
    originals = {n: _keep(by_name[n].weight, KeepOriginals(config.keep_originals)) for n in chosen.chosen}
    fused_parts = _fused_parts(component, path, names)
    shared = {id(c) for c in configs.values()}
    if len(shared) == 1:  # one config for all (dynamic modes): one pass that filters by module
        modules = {id(by_name[n]) for n in chosen.chosen}
        quantize_(component, next(iter(configs.values())), filter_fn=lambda m, fqn: id(m) in modules)
    elif configs:
        relative = OrderedDict((n[len(path) + 1:], c) for n, c in configs.items())
        quantize_(component, FqnToConfig(relative), filter_fn=None)
    _move_parts(fused_parts, by_name, originals)
    for name in chosen.chosen:
        weight = by_name[name].weight
        if not hasattr(weight, "tensor_data_names"):  # torchao declined it (a shape its kernels refuse)
            chosen.skipped[name] = "left in high precision by torchao"
            continue
        record = QuantizedWeight(name, configs[name], target, originals[name])
        register(weight, record)
        state.records.append(record)
        state.layers.append(name)
    state.skipped.update(chosen.skipped)


def torchao_version() -> Optional[str]:
    try:
        return version("torchao")
    except PackageNotFoundError:
        return None
