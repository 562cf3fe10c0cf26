"""In-place fusing with exact unfusing.

Fused weights are always computed from the original weights ``W0``:
``W = round(W0 + sum_i w_i * scale_i * up_i @ down_i)``, accumulated in float32 and rounded once
to the weight's dtype. Switching adapters therefore never accumulates rounding error, and
restoring ``W0`` is a copy, so unfusing is bit-exact however often one switched.

The update writes into the parameter's existing storage (``Parameter.copy_``): modules are never
replaced and the storage never moves, so a compiled graph that reads parameters as inputs sees the
new weights without recompiling. ``W0`` of each touched weight is kept on the offload device the
first time it is touched; the parameter's version counter tells whether someone else (for example
``load_state_dict``) wrote the weight since, in which case that becomes the new ``W0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional

import torch

from .fit import Target
from .formats import TargetKey

STATE_ATTR = "_onediffx_lora"


@dataclass
class Adapter:
    """A loaded LoRA: its name, where it came from, and its factors per target weight."""

    name: str
    label: str
    targets: Dict[TargetKey, Target]


@dataclass
class LoraState:
    """What one pipeline's LoRA engine knows; kept on the pipeline object."""

    adapters: Dict[str, Adapter] = field(default_factory=dict)
    active: Dict[str, float] = field(default_factory=dict)
    """Adapters fused now, with their weights, in fuse order."""
    originals: Dict[TargetKey, torch.Tensor] = field(default_factory=dict)
    params: Dict[TargetKey, torch.nn.Parameter] = field(default_factory=dict)
    written: Dict[TargetKey, int] = field(default_factory=dict)
    """The parameter's ``_version`` right after onediffx last wrote it (or backed it up)."""
    fused: set = field(default_factory=set)
    """Targets whose weight currently differs from ``W0``."""
    offload_device: str = "cpu"
    """Where new ``W0`` copies go; set by the last load, used by later switches."""


def state_of(pipeline: Any) -> LoraState:
    state = getattr(pipeline, STATE_ATTR, None)
    if state is None:
        state = LoraState()
        object.__setattr__(pipeline, STATE_ATTR, state)
    return state


def resolve_offload(offload_device: str, like: torch.Tensor) -> torch.device:
    """``cuda`` on a machine without CUDA (or for CPU weights) means "where the weight is"."""
    try:
        device = torch.device(offload_device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"offload_device must be 'cpu' or 'cuda', not {offload_device!r}")
    if device.type == "cuda" and (like.device.type != "cuda" or device.index is None):
        return like.device  # no CUDA here, or "cuda" without an index: the weight's own device
    return device


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu" and tensor.device.type == "cuda":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)
    return tensor.detach().to(device, copy=True)


def _original(state: LoraState, key: TargetKey, param: torch.nn.Parameter, offload: torch.device) -> torch.Tensor:
    """``W0`` of a weight, backing it up first if onediffx has no valid copy."""
    changed_elsewhere = state.written.get(key) != param._version or state.params.get(key) is not param
    if key not in state.originals or changed_elsewhere:
        state.originals[key] = _copy_to(param.detach(), offload)
        state.params[key] = param
        state.written[key] = param._version
        state.fused.discard(key)
    return state.originals[key]


def fuse(state: LoraState, weights: Dict[str, float], offload_device: str = "cpu") -> int:
    """Make the pipeline's weights ``W0 + sum(weights[a] * delta_a)``; return how many were recomputed.

    Only weights touched by an adapter whose weight changes are rewritten; weights fused before
    and touched by no adapter in ``weights`` are restored to ``W0``. Terms are summed in load order
    whatever the order of ``weights``, so the same set of adapters always gives the same bits.
    """
    weights = {n: w for n, w in weights.items() if w != 0}
    changed = {n for n in set(state.active) | set(weights) if state.active.get(n, 0) != weights.get(n, 0)}
    dirty = set()
    for name in changed:
        dirty.update(state.adapters[name].targets)
    plan: Dict[TargetKey, list] = {}
    for name, adapter in state.adapters.items():
        if name in weights:
            for key, target in adapter.targets.items():
                if key in dirty:
                    plan.setdefault(key, []).append((target, weights[name] * target.scale))
    offloads: Dict[torch.device, torch.device] = {}
    with torch.no_grad():
        for key in [k for k in dirty if k in state.fused and k not in plan]:
            _restore(state, key)
        for key, terms in plan.items():
            param = terms[0][0].param
            device = param.device
            if device not in offloads:
                offloads[device] = resolve_offload(offload_device, param)
            w0 = _original(state, key, param, offloads[device])
            _write(param, w0, terms)
            state.written[key] = param._version
            state.fused.add(key)
    state.active = {n: weights[n] for n in state.adapters if n in weights}
    return len(plan)


def _write(param: torch.nn.Parameter, w0: torch.Tensor, terms: list) -> None:
    """``param = round(W0 + sum(coef * up @ down))`` with the sum in float32, into param's storage."""
    device, rows = param.device, param.shape[0]
    if (len(terms) == 1 and param.dtype == torch.float32 and w0.device == device and param.is_contiguous()
            and w0.is_contiguous()):  # float32 already: one kernel, straight into the weight
        target, coef = terms[0]
        torch.addmm(w0.view(rows, -1), target.up.to(device), target.down.to(device), alpha=coef,
                    out=param.view(rows, -1))
        return
    # reshape, not view: channels_last conv weights are not contiguous
    acc = w0.to(device=device, dtype=torch.float32, non_blocking=True, copy=True).reshape(rows, -1)
    for target, coef in terms:
        acc.addmm_(target.up.to(device), target.down.to(device), alpha=coef)
    param.copy_(acc.view(param.shape))


def _restore(state: LoraState, key: TargetKey) -> None:
    param = state.params[key]
    if state.written.get(key) == param._version:  # untouched by others since we wrote it
        param.copy_(state.originals[key], non_blocking=True)
        state.written[key] = param._version
    state.fused.discard(key)


def unfuse(state: LoraState) -> None:
    """Put ``W0`` back into every fused weight (bit-exact: a copy, not a subtraction)."""
    with torch.no_grad():
        for key in list(state.fused):
            _restore(state, key)
    state.active = {}


def forget_originals(state: LoraState, keys: Optional[Iterable[TargetKey]] = None) -> None:
    """Drop ``W0`` copies of weights that are not fused (all of them when ``keys`` is None)."""
    for key in list(state.originals if keys is None else keys):
        if key not in state.fused:
            state.originals.pop(key, None)
            state.params.pop(key, None)
            state.written.pop(key, None)
