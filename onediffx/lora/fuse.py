"""In-place fusing with exact unfusing.

Fused weights are always computed from the original weights ``W0``:
``W = round(W0 + sum_i w_i * scale_i * up_i @ down_i)``, accumulated in float32 and rounded once
to the weight's dtype. Switching adapters therefore never accumulates rounding error, and
restoring ``W0`` is a copy, so unfusing is bit-exact however often one switched.

Where it can, a weight is updated by one matmul in its own dtype, ``addmm`` with ``W0`` as the
addend: fp16/bf16 matmuls (cuBLAS, and PyTorch's CPU kernels) multiply and accumulate in float32
and round once when they write, so this is the same arithmetic as the float32 path, one kernel
instead of four. It needs the factors in the weight's dtype (``fit.factor_dtype``) and one
coefficient for all terms: several adapters become one matmul over their concatenated factors
when their ``w_i * scale_i`` agree. Otherwise (fp16/bf16 weights with adapters at different
weights, float32 factors on fp16 weights, channels_last convolutions) the sum is accumulated in a
float32 copy and written back. float32 weights always take the first path (one matmul per term
when the coefficients differ). cuBLAS never splits a sum over K = total rank this small, so the
float32 accumulation holds on the GPU too. A given set of adapters and weights always takes the
same path, so it always gives the same bits.

The update writes into the parameter's existing storage: modules are never replaced and the
storage never moves, so a compiled graph that reads parameters as inputs sees the new weights
without recompiling. ``W0`` of each touched weight is kept on the offload device the first time it
is touched, all of one load in a few large copies; the parameter's version counter tells whether
someone else (for example ``load_state_dict``) wrote the weight since, in which case that becomes
the new ``W0``.

Quantized weights (``onediffx.quantize``) are fused from their high-precision originals, which
quantization kept: ``W = quantize(W0_hp + sum ...)``, re-quantized with the layer's own recipe into
the quantized tensors' own storage; the quantized ``W0`` is saved first and unfusing copies it back,
bit for bit. fp8 weights are fused and re-quantized many at a time (``_write_quantized``), and the
q/k/v projections of a quantized fused copy are fused into the copy's rows (``fit.Target.into``).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .. import quantized_weights as quantized
from ..state import LORA
from .errors import LoraError
from .fit import Target, calibrated_refusal
from .formats import TargetKey



@dataclass
class Adapter:
    """A loaded LoRA: its name, where it came from, and its factors per target weight."""

    name: str
    label: str
    targets: Dict[TargetKey, Target]


@dataclass
class LoraState:
    """What one pipeline's LoRA engine knows; kept in the pipeline's ``state.LORA`` slot."""

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
    projection_versions: Dict[int, Tuple[int, ...]] = field(default_factory=dict)
    """Per fused attention, its parts' versions when last copied into the fused projection."""
    attentions: Optional[Tuple[List[Any], List[Any]]] = None
    """Weak references to the pipeline's components and to their attention modules, found once per
    set of components: each switch checks them for fused projections, and walking every module of
    SDXL costs ~15 ms (``fused_projections``)."""
    quantized: Dict[TargetKey, List[torch.Tensor]] = field(default_factory=dict)
    """Quantized weights: their quantized ``W0`` (inner tensors), put back on unfuse; ``originals``
    then holds the high-precision ``W0`` that fusing computes from."""


def state_of(pipeline: Any) -> LoraState:
    """The pipeline's LoRA state, made empty on first use."""
    state = LORA.get(pipeline)
    return state if state is not None else LORA.set(pipeline, LoraState())


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


BACKUP_CHUNK = 2**30
"""Bytes per backup buffer: big enough for few copies, small enough not to need one huge free block."""


def _copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all i: a few multi-tensor kernels when all are on one device, else
    one asynchronous copy each (from pinned host memory they do not wait for each other)."""
    if all(d.device == s.device for d, s in zip(dst, src)):
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s, non_blocking=True)


def _needs_backup(state: LoraState, key: TargetKey, param: torch.nn.Parameter) -> bool:
    """No valid ``W0`` copy: never backed up, or someone else wrote the weight since onediffx did."""
    return key not in state.originals or state.written.get(key) != param._version or state.params.get(key) is not param


def _back_up(state: LoraState, params: Dict[TargetKey, torch.nn.Parameter], offload_device: str) -> None:
    """Keep ``W0`` of these weights on the offload device; the weights then equal their ``W0``.

    On the weight's own device the copies are views of a few large buffers filled by multi-tensor
    copies: a load touches about a thousand weights, and one allocation and kernel launch per weight
    costs more than the copying. Copies to the CPU (pinned, so asynchronous) stay one per weight:
    pinned buffers are rounded up to a power of two, which would waste up to half of a large one.
    """
    offloads: Dict[torch.device, torch.device] = {}
    groups: Dict[Tuple[torch.device, torch.dtype], List[TargetKey]] = {}
    for key, param in params.items():
        record = quantized.record_of(param)
        if record is not None:
            _back_up_quantized(state, key, param, record, offload_device)
            continue
        if param.device not in offloads:
            offloads[param.device] = resolve_offload(offload_device, param)
        if offloads[param.device] == param.device:
            groups.setdefault((param.device, param.dtype), []).append(key)
        else:
            state.originals[key] = _copy_to(param.detach(), offloads[param.device])
    for (device, dtype), keys in groups.items():
        for chunk in _chunks(keys, lambda k: params[k].numel(), BACKUP_CHUNK // dtype.itemsize):
            flat = torch.empty(sum(params[k].numel() for k in chunk), dtype=dtype, device=device)
            views, start = [], 0
            for key in chunk:
                n = params[key].numel()
                views.append(flat[start:start + n].view(params[key].shape))
                start += n
            _copy_all(views, [params[k] for k in chunk])
            state.originals.update(zip(chunk, views))
    for key, param in params.items():
        state.params[key] = param
        state.written[key] = param._version
        state.fused.discard(key)


def _back_up_quantized(state: LoraState, key: TargetKey, param: torch.nn.Parameter,
                       record: quantized.QuantizedWeight, offload_device: str) -> None:
    """Quantized ``W0`` saved for unfusing; the high-precision original (kept by quantization) to fuse from."""
    if record.original is None:
        raise LoraError(f"LoRA: {record.name} is quantized and its high-precision weights were not kept "
                        "(quantize.keep_originals=none); quantize with keep_originals=cpu or device to fuse LoRAs")
    state.quantized[key] = quantized.snapshot(param, resolve_offload(offload_device, param))
    state.originals[key] = record.original


def _chunks(items: list, size: Callable[[Any], int], limit: int) -> Iterable[list]:
    """``items`` in runs of at most ``limit`` in ``size`` (a bigger item gets a run of its own)."""
    run: list = []
    total = 0
    for item in items:
        n = size(item)
        if run and total + n > limit:
            yield run
            run, total = [], 0
        run.append(item)
        total += n
    if run:
        yield run


def fuse(state: LoraState, weights: Dict[str, float], offload_device: str = "cpu") -> int:
    """Make the pipeline's weights ``W0 + sum(weights[a] * delta_a)``; return how many were recomputed.

    Only weights touched by an adapter whose weight changes are rewritten; weights fused before
    and touched by no adapter in ``weights`` are restored to ``W0``. Terms are summed in load order
    whatever the order of ``weights``, so the same set of adapters always gives the same bits.
    """
    weights = {n: w for n, w in weights.items() if w != 0}
    changed = {n for n in set(state.active) | set(weights) if state.active.get(n, 0) != weights.get(n, 0)}
    dirty = set()  # keys of the weights written: a part of a quantized fused copy writes the copy (Target.into)
    for name in changed:
        dirty.update(target.into or key for key, target in state.adapters[name].targets.items())
    plan: Dict[TargetKey, list] = {}
    for name, adapter in state.adapters.items():
        if name in weights:
            for key, target in adapter.targets.items():
                if (target.into or key) in dirty:
                    plan.setdefault(target.into or key, []).append((target, weights[name] * target.scale))
    _refuse_calibrated(plan)
    with torch.no_grad():
        _restore_all(state, [k for k in dirty if k in state.fused and k not in plan])
        params = {key: terms[0][0].param for key, terms in plan.items()}
        _back_up(state, {k: p for k, p in params.items() if _needs_backup(state, k, p)}, offload_device)
        requantized = [key for key in plan if key in state.quantized]
        for key, terms in plan.items():
            if key not in state.quantized:  # Not fused now (just backed up, restored, or never fused): W0 already.
                _write(params[key], None if key not in state.fused else state.originals[key], terms)
                state.written[key] = params[key]._version
                state.fused.add(key)
        # Marked fused before they are written: should the batch fail half-way (out of memory), the
        # next fuse or unfuse restores them from their saved W0 instead of leaving a half-fused mix.
        state.fused.update(requantized)
        _write_quantized([(params[key], state.originals[key], plan[key]) for key in requantized])
        state.written.update((key, params[key]._version) for key in requantized)
    state.active = {n: weights[n] for n in state.adapters if n in weights}
    return len(plan)


def _refuse_calibrated(plan: Dict[TargetKey, list]) -> None:
    """Refuse, before any weight is written, to fuse into layers with calibrated activation scales.

    A static scale was fixed from the inputs the layer saw when calibrated; a LoRA changes the
    activations that reach it (its own layer's outputs and everything downstream), and values past
    the calibrated range would be clipped without a word. Dynamic scales follow whatever arrives.
    """
    for key, terms in plan.items():
        record = quantized.record_of(terms[0][0].param)
        if record is not None and record.static:
            raise calibrated_refusal(record.name)


def _write(param: torch.nn.Parameter, w0: Optional[torch.Tensor], terms: list) -> None:
    """``param = round(W0 + sum(coef * up @ down))`` with the sum in float32, into param's storage.

    ``w0`` is None when ``param`` holds ``W0`` now: the matmul then adds straight into it.
    """
    dtype = param.dtype
    coefs = {coef for _, coef in terms}
    if (param.is_contiguous() and all(t.up.dtype == dtype and t.down.dtype == dtype for t, _ in terms)
            and (dtype == torch.float32 or len(coefs) == 1)):
        _write_native(param, w0, _products(terms, param.device, len(coefs) == 1))
    else:
        _write_float32(param, param if w0 is None else w0, terms)


def _products(terms: list, device: torch.device, one_coef: bool) -> List[Tuple[torch.Tensor, torch.Tensor, float]]:
    """(up, down, coef) per matmul: all terms concatenated into one when they share a coefficient."""
    products = [(t.up.to(device, non_blocking=True), t.down.to(device, non_blocking=True), c) for t, c in terms]
    if one_coef and len(products) > 1:  # [up_1 .. up_k] @ [down_1; ..; down_k] = sum_i up_i @ down_i
        ups, downs, coefs = zip(*products)
        return [(torch.cat(ups, 1), torch.cat(downs), coefs[0])]
    return products


def _write_native(param: torch.nn.Parameter, w0: Optional[torch.Tensor],
                  products: List[Tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """``addmm`` in the weight's dtype, straight into the weight (see the module docstring)."""
    out = param.view(param.shape[0], -1)
    for i, (up, down, coef) in enumerate(products):
        if i == 0 and w0 is not None:  # copies W0 into out, then the very matmul addmm_ would do
            torch.addmm(w0.to(param.device, non_blocking=True).view(out.shape), up, down, alpha=coef, out=out)
        else:
            out.addmm_(up, down, alpha=coef)


def _float32_factors(target: Target, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``target``'s factors in float32 on ``device``; fp16/bf16 factors kept there are converted once."""
    if target.float32 is not None and target.float32[0].device == device:
        return target.float32
    up = target.up.to(device, torch.float32, non_blocking=True)
    down = target.down.to(device, torch.float32, non_blocking=True)
    if target.up.device == device and target.up.dtype != torch.float32:
        target.float32 = (up, down)
    return up, down


def _write_float32(param: torch.nn.Parameter, w0: torch.Tensor, terms: list) -> None:
    """The general path: ``W0`` in float32 (reshape: channels_last conv weights are not contiguous)."""
    param.copy_(_float32_sum(w0, param.device, terms).view(param.shape))


def _float32_sum(w0: torch.Tensor, device: torch.device, terms: list) -> torch.Tensor:
    """``W0 + sum(coef * up @ down)`` in a float32 copy on ``device``, one row per output."""
    acc = w0.to(device=device, dtype=torch.float32, non_blocking=True, copy=True,
                memory_format=torch.contiguous_format).view(w0.shape[0], -1)
    _add_terms(acc, terms, device)
    return acc


def _add_terms(acc: torch.Tensor, terms: list, device: torch.device) -> None:
    """Add each term into its rows of ``acc`` (float32): all of them, or a fused copy's part at its ``row``."""
    for target, coef in terms:
        acc[target.row:target.row + target.up.shape[0]].addmm_(*_float32_factors(target, device), alpha=coef)


STACK_ELEMENTS = 2**24
"""Elements of the float32 buffer quantized weights are fused in together: 64 MiB, about 350 MiB with
the temporaries of quantizing it, which is what SDXL's largest weight took on its own before. About
180 runs for a switch on SDXL."""


def _write_quantized(items: List[Tuple[torch.nn.Parameter, torch.Tensor, list]]) -> None:
    """``param = quantize(W0 + sum(coef * up @ down))`` for each (param, high-precision ``W0``, terms).

    Weights that ``quantized.stack_key`` says can be re-quantized together are fused as rows of one
    float32 buffer per run: their ``W0`` copied in (``_staged``), each term added into its rows (a
    part of a fused q/k/v copy at its ``row``), then one scale and cast for the run. Per weight that
    leaves a copy and a matmul per term, where re-quantizing alone costs about ten kernels; the
    float32 sum is the same as ``_write_float32``'s.
    """
    groups: Dict[tuple, list] = {}
    for item in items:
        key = quantized.stack_key(item[0])
        if key is None:
            _write_quantized_one(*item)
        else:
            groups.setdefault(key, []).append(item)
    for (device, dtype, _, width), group in groups.items():
        runs = list(_chunks(group, lambda item: item[1].shape[0] * width, STACK_ELEMENTS))
        for run, staged in _staged(runs, device, dtype, width):
            acc = staged.float()
            for rows, (_, _, terms) in zip(acc.split([w0.shape[0] for _, w0, _ in run]), run):
                _add_terms(rows, terms, device)
            quantized.requantize_rows([param for param, _, _ in run], acc)


@functools.lru_cache(maxsize=None)
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _staged(runs: List[list], device: torch.device, dtype: torch.dtype, width: int
            ) -> Iterator[Tuple[list, torch.Tensor]]:
    """Each run with its ``W0`` copied into one (rows, width) buffer.

    From pinned host memory (``keep_originals=cpu``) the next run's copy runs on a side stream while
    this run computes: on the same stream the copies and the math would take turns, and the copies
    alone take as long as the math (SDXL: ~2 GB over PCIe, ~80 ms on an H200). Each buffer comes
    from the side stream's pool and is marked as used by the compute stream before it is read.
    """
    side = _copy_stream(device) if device.type == "cuda" and runs[0][0][1].device.type == "cpu" else None

    def stage(run: list) -> Tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            sizes = [w0.shape[0] for _, w0, _ in run]
            staged = torch.empty(sum(sizes), width, dtype=dtype, device=device)
            _copy_all(list(staged.split(sizes)), [w0 for _, w0, _ in run])
            return staged, side.record_event() if side is not None else None

    ahead = stage(runs[0])
    for i, run in enumerate(runs):
        staged, copied = ahead
        if i + 1 < len(runs):
            ahead = stage(runs[i + 1])
        if copied is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_event(copied)
            staged.record_stream(compute)
        yield run, staged


def _write_quantized_one(param: torch.nn.Parameter, w0: torch.Tensor, terms: list) -> None:
    """One weight of ``_write_quantized`` that cannot be stacked (int8, per-tensor scales), on its own."""
    quantized.requantize(param, _float32_sum(w0, param.device, terms).view(param.shape))


def _restore_all(state: LoraState, keys: List[TargetKey]) -> None:
    """Copy ``W0`` back into these weights, unless someone else wrote one since onediffx did."""
    by_device: Dict[torch.device, List[TargetKey]] = {}
    for key in keys:
        param, w0 = state.params[key], state.originals[key]
        if state.written.get(key) != param._version:
            continue  # the weight's new value is someone else's: leave it
        if key in state.quantized:  # the saved quantized W0, bit for bit
            quantized.restore(param, state.quantized[key])
            continue
        if w0.device == param.device:  # multi-tensor copies need all tensors on one device
            by_device.setdefault(param.device, []).append(key)
        else:
            param.copy_(w0, non_blocking=True)
            state.written[key] = param._version
    for group in by_device.values():
        _copy_all([state.params[k] for k in group], [state.originals[k] for k in group])
        state.written.update((k, state.params[k]._version) for k in group)
    state.fused.difference_update(keys)


def unfuse(state: LoraState) -> None:
    """Put ``W0`` back into every fused weight (bit-exact: a copy, not a subtraction)."""
    with torch.no_grad():
        _restore_all(state, list(state.fused))
    state.active = {}


def forget_originals(state: LoraState, keys: Optional[Iterable[TargetKey]] = None) -> None:
    """Drop ``W0`` copies of weights that are not fused (all of them when ``keys`` is None).

    Copies made together share a buffer, which is freed when the last of them is dropped.
    """
    for key in list(state.originals if keys is None else keys):
        if key not in state.fused:
            state.originals.pop(key, None)
            state.quantized.pop(key, None)
            state.params.pop(key, None)
            state.written.pop(key, None)
