"""The public LoRA functions, with OneDiffX's signatures.

Compared with diffusers' ``load_lora_weights`` + ``fuse_lora``: no PEFT layers are injected and no
module is replaced; the LoRA is read straight onto the weights' device, checked whole against the
pipeline, and added into the existing weights. Adapter names work as in diffusers: several LoRAs
stay loaded and ``set_and_fuse_adapters`` recombines them from the original weights.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from . import fuse as _fuse
from .fit import fit, lora_components
from .fused_projections import sync as _sync_fused
from .formats import to_canonical
from .sources import read_lora

log = logging.getLogger(__name__)

_READ_KWARGS = ("weight_name", "subfolder", "cache_dir", "revision")
_IGNORED_KWARGS = ("local_files_only", "use_safetensors", "low_cpu_mem_usage", "force_download", "proxies", "token")
_OFFLOAD_WEIGHTS = ("lora", "weight")


def _compute_device(components: Dict[str, torch.nn.Module]) -> torch.device:
    for name in ("unet", "transformer", *components):
        module = components.get(name)
        param = next(module.parameters(), None) if module is not None else None
        if param is not None:
            return param.device
    return torch.device("cpu")


def _default_name(state: _fuse.LoraState) -> str:
    i = 0
    while f"default_{i}" in state.adapters:
        i += 1
    return f"default_{i}"


def _offload_factors(adapter: _fuse.Adapter, device: torch.device) -> None:
    for target in adapter.targets.values():
        if target.up.device != device:
            target.up = _fuse._copy_to(target.up, device)
            target.down = _fuse._copy_to(target.down, device)
            target.float32 = None


def load_lora_and_optionally_fuse(
    pipeline: Any,
    pretrained_model_name_or_path_or_dict: Union[str, Path, Dict[str, torch.Tensor]],
    adapter_name: Optional[str] = None,
    *,
    fuse: bool,
    lora_scale: Optional[float] = None,
    offload_device: str = "cuda",
    use_cache: bool = False,
    **kwargs: Any,
) -> None:
    """Load a LoRA as adapter ``adapter_name`` and, with ``fuse``, fuse it at ``lora_scale``.

    ``fuse=True`` adds this adapter to those already fused (like diffusers' load + ``fuse_lora``),
    but computed from the original weights, so stacking LoRAs this way does not lose precision.
    ``offload_device`` holds the original weights kept for exact unfusing (``cuda`` keeps them on
    the GPU: fastest switching, more GPU memory); ``offload_weight="lora"`` (a keyword) also moves
    the LoRA's own factors there between uses, ``"weight"`` keeps the factors on the weights' device.
    An ``adapter_name`` that is already loaded is ignored, as in OneDiffX.
    """
    offload_weight = kwargs.pop("offload_weight", "lora")
    if offload_weight not in _OFFLOAD_WEIGHTS:
        raise ValueError(f"offload_weight must be one of {_OFFLOAD_WEIGHTS}, not {offload_weight!r}")
    read_kwargs = {k: kwargs.pop(k) for k in _READ_KWARGS if k in kwargs}
    for key in _IGNORED_KWARGS:  # accepted for diffusers compatibility; onediffx never downloads
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(kwargs))}")

    _fuse.resolve_offload(offload_device, torch.empty(0))  # reject a bad device before reading anything
    state = _fuse.state_of(pipeline)
    name = adapter_name or _default_name(state)
    if name in state.adapters:
        warnings.warn(f"LoRA adapter {name!r} is already loaded; ignoring this load (delete_adapters first)")
        return
    components = lora_components(pipeline)
    device = _compute_device(components)
    raw = read_lora(pretrained_model_name_or_path_or_dict, device, use_cache=use_cache, **read_kwargs)
    unet = components.get("unet")
    layers = to_canonical(raw, components, getattr(unet, "config", None), type(pipeline))
    adapter = _fuse.Adapter(name, raw.label, fit(layers, pipeline, raw.label, device))
    state.adapters[name] = adapter
    state.offload_device = offload_device
    if fuse:
        weights = dict(state.active)
        weights[name] = 1.0 if lora_scale is None else float(lora_scale)
        _fuse.fuse(state, weights, offload_device)
        _sync_fused(pipeline, state)
    if offload_weight == "lora":
        _offload_factors(adapter, _fuse.resolve_offload(offload_device, next(iter(adapter.targets.values())).up))
    log.debug("loaded LoRA %s as %r: %d layers", raw.label, name, len(adapter.targets))


def load_and_fuse_lora(
    pipeline: Any,
    pretrained_model_name_or_path_or_dict: Union[str, Path, Dict[str, torch.Tensor]],
    adapter_name: Optional[str] = None,
    *,
    lora_scale: float = 1.0,
    offload_device: str = "cpu",
    offload_weight: str = "lora",
    use_cache: bool = False,
    **kwargs: Any,
) -> None:
    """``load_lora_and_optionally_fuse`` with ``fuse=True``: the one-call load + fuse."""
    load_lora_and_optionally_fuse(
        pipeline, pretrained_model_name_or_path_or_dict, adapter_name, fuse=True, lora_scale=lora_scale,
        offload_device=offload_device, use_cache=use_cache, offload_weight=offload_weight, **kwargs,
    )


def unfuse_lora(pipeline: Any) -> None:
    """Restore the original weights bit-exactly; adapters stay loaded for ``set_and_fuse_adapters``.

    The copies of the original weights are kept, so fusing again skips the backup;
    ``delete_adapters()`` (all of them) frees them.
    """
    state = _fuse.state_of(pipeline)
    _fuse.unfuse(state)
    _sync_fused(pipeline, state)


def _names(adapter_names: Union[List[str], str, None]) -> List[str]:
    if adapter_names is None:
        return []
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def set_and_fuse_adapters(
    pipeline: Any,
    adapter_names: Union[List[str], str],
    adapter_weights: Optional[Union[List[float], float]] = None,
) -> None:
    """Fuse exactly these adapters with these weights (default 1.0), replacing what was fused.

    Equivalent to diffusers' ``set_adapters`` + ``fuse_lora``; names that are not loaded are
    ignored with a warning, as in OneDiffX. No file is read: loaded adapters live in memory.
    """
    state = _fuse.state_of(pipeline)
    names = _names(adapter_names)
    if adapter_weights is None:
        weights = [1.0] * len(names)
    elif isinstance(adapter_weights, (int, float)):
        weights = [float(adapter_weights)] * len(names)
    else:
        weights = [float(w) for w in adapter_weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter weights")
    chosen: Dict[str, float] = {}
    for name, weight in zip(names, weights):
        if name not in state.adapters:
            warnings.warn(f"LoRA adapter {name!r} is not loaded; ignoring it")
            continue
        chosen[name] = weight
    _fuse.fuse(state, chosen, state.offload_device)
    _sync_fused(pipeline, state)


def delete_adapters(pipeline: Any, adapter_names: Union[List[str], str, None] = None) -> None:
    """Forget adapters (all when ``adapter_names`` is None); fused ones are unfused first.

    The remaining fused adapters are recombined from the original weights, so deleting one of
    several fused LoRAs leaves exactly the others.
    """
    state = _fuse.state_of(pipeline)
    names = list(state.adapters) if adapter_names is None else _names(adapter_names)
    remaining = {n: w for n, w in state.active.items() if n not in names}
    if len(remaining) != len(state.active):
        _fuse.fuse(state, remaining, state.offload_device)
        _sync_fused(pipeline, state)
    for name in names:
        state.adapters.pop(name, None)
    if not state.adapters:
        _fuse.forget_originals(state)


def update_graph_with_constant_folding_info(module: torch.nn.Module, info: Optional[Dict[str, Any]] = None) -> None:
    """Nothing to do for onediffx's compiled graphs; kept for OneDiffX compatibility.

    OneDiffX's oneflow graphs folded weights into constants, so a fused LoRA had to be pushed into
    the graph. torch.compile/Inductor passes parameters to the compiled graph as inputs (unless
    ``torch._inductor.config.freezing`` is on), and onediffx updates them in place, so the graph
    already reads the new weights. With freezing on, weights are baked in and only a recompile can
    pick up a LoRA; this function says so instead of silently doing nothing.
    """
    try:
        from torch._inductor import config as inductor_config
    except ImportError:  # pragma: no cover - torch without inductor
        return
    if getattr(inductor_config, "freezing", False):
        warnings.warn(
            "torch._inductor.config.freezing is on: compiled graphs hold weights as constants and will not "
            "see fused LoRAs until recompiled; compile without freezing to switch LoRAs in place"
        )
