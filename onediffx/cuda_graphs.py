"""CUDA graphs over compiled forwards: one graph per call signature, replayed with a single launch.

A compiled SDXL UNet step launches about a thousand kernels from Inductor's Python wrapper. On
an H100 that costs 39.8 ms per step where the kernels themselves take 31.4 ms: the GPU waits for
the CPU. Replaying a captured graph launches them all at once (32.8 ms). Inductor's own CUDA
graphs (``mode="reduce-overhead"``) only exist on Dynamo's lazy path; this wrapper works over any
callable, so it also covers the ahead-of-time graphs loaded from the graph cache and each
DeepCache pass: compile and DeepCache both use it, so it sits below both and imports neither.

What a captured graph assumes, and how this module keeps it true:

* Inputs live at fixed addresses. Each call copies its tensors into the graph's static inputs
  (a few small copies per UNet step) and returns clones of the static outputs, so callers may
  keep results across calls.
* Parameters stay where they were. In-place updates (LoRA fusing, ``load_state_dict``) are seen
  by the next replay; a module moved or cast (``.to``) has new parameter addresses, and the
  addresses of nine parameters spread over the module are part of the key, so it is captured
  again. Replacing other single parameters by assignment is not detected: call ``reset()``.
* Everything runs on one CUDA device with no host synchronisation. A call with a tensor
  elsewhere, or whose capture fails, runs uncaptured for that signature and says so once.
* Signatures are few (resolutions, batch sizes). Past ``MAX_GRAPHS`` of them, something changes
  at every call (a Python-number timestep, weights offloaded and reloaded at new addresses), and
  capturing each would cost three runs per call: further signatures run uncaptured, said once.

All graphs of one wrapper share a memory pool: calls never overlap, and outputs are cloned
before the next replay, so switching among resolutions does not grow memory per switch.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_map_only

from .call_signature import describe
from .hooks import CUDA_GRAPHS, ForwardHook, add_hook, remove_hook
from .state import PASS_GRAPHS

log = logging.getLogger("onediffx.compile.cuda_graphs")  # compile's, as where it came from

_UNGRAPHABLE = object()
MAX_GRAPHS = 16
_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream per device that every warm-up and capture runs on.

    cuBLAS keeps a workspace for each stream it has run on (33 MiB on an H200) until the process
    ends. A new stream per capture cost one workspace per captured graph, never given back: 200 MiB
    for the tiny SDXL's six graphs, 0.13 GiB after a compiled SDXL row of the bench on an H200
    (``benchmarks/scripts/release_check.py``).
    """
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


def _tensors(value: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of a call's arguments, in the order ``_rebuild`` puts them back."""
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _tensors(v, out)
    return out


def _rebuild(value: Any, tensors: Any) -> Any:
    """``value`` with its tensors replaced, in order, by the ones ``tensors`` yields."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, dict):
        return {k: _rebuild(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, tensors) for v in value)
    return value


class _Captured:
    """One captured graph: its static inputs (in ``_tensors`` order) and static output tree."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: Any) -> None:
        self.graph = graph
        self.inputs = inputs
        self.output = output

    def replay(self, tensors: list[torch.Tensor]) -> Any:
        for static, value in zip(self.inputs, tensors):
            if static.data_ptr() != value.data_ptr():
                static.copy_(value)
        self.graph.replay()
        return tree_map_only(torch.Tensor, torch.Tensor.clone, self.output)


class CudaGraphs:
    """``fn`` with each distinct call captured once into a CUDA graph and replayed afterwards.

    ``module`` is the module whose parameters the graphs read (its first parameter's address is
    part of the key). ``fn`` may compile on its first call for a signature: that call runs
    uncaptured, a second one warms up on the capture stream, and the third is captured.
    """

    def __init__(self, fn: Callable[..., Any], module: torch.nn.Module, name: str) -> None:
        self.fn = fn
        self.module = module
        self.name = name
        self.graphs: dict[tuple, Any] = {}
        self.captures = 0
        """Graphs captured so far (over the wrapper's life)."""
        self._pool: Optional[tuple] = None
        self._probe: Optional[list[tuple[torch.nn.Module, str]]] = None
        self._warned: set[str] = set()

    def reset(self) -> None:
        """Forget every captured graph (after replacing parameters by assignment)."""
        self.graphs.clear()
        self._pool = None
        self._probe = None

    def _key(self, args: tuple, kwargs: dict) -> tuple:
        if self._probe is None:  # parameter slots spread over the module: a move or cast changes them all
            slots = [(m, n) for m in self.module.modules() for n in m._parameters]
            self._probe = slots[:: max(1, len(slots) // 8)] + slots[-1:]
        params = [m._parameters.get(n) for m, n in self._probe]  # read through the slot: assignment shows
        where = tuple(None if p is None else p.data_ptr() for p in params)
        first = params[0] if params else None
        layout = None if first is None else (first.dtype, first.device, tuple(first.stride()))
        return (where, layout, self.module.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cuda"),
                describe(args), describe(kwargs))

    @torch.compiler.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self._key(args, kwargs)
        captured = self.graphs.get(key)
        tensors = _tensors((args, kwargs), [])
        if captured is None:
            return self._first_call(key, tensors, args, kwargs)
        if captured is _UNGRAPHABLE:
            return self.fn(*args, **kwargs)
        return captured.replay(tensors)

    def _first_call(self, key: tuple, tensors: list[torch.Tensor], args: tuple, kwargs: dict) -> Any:
        out = self.fn(*args, **kwargs)  # compiles (or binds a loaded graph) and autotunes outside capture
        device = next((t.device for t in tensors if t.is_cuda), None)
        if device is None or any(t.device != device for t in tensors):
            self._ungraphable(key, "its tensors are not all on one CUDA device")
            return out
        if sum(g is not _UNGRAPHABLE for g in self.graphs.values()) >= MAX_GRAPHS:
            self._ungraphable(key, f"{MAX_GRAPHS} input signatures are captured already; does an argument "
                                   "(a Python-number timestep?) or a weight address change at every call?")
            return out
        try:
            self.graphs[key] = self._capture(device, tensors, args, kwargs)
            self.captures += 1
        except Exception as exc:  # noqa: BLE001  (any capture failure leaves the call uncaptured)
            torch.cuda.synchronize(device)
            self._ungraphable(key, f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return out

    def _capture(self, device: torch.device, tensors: list[torch.Tensor], args: tuple, kwargs: dict) -> _Captured:
        inputs = [t.clone() for t in tensors]  # clone keeps strides of dense tensors
        s_args, s_kwargs = _rebuild((args, kwargs), iter(inputs))
        stream = _capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.fn(*s_args, **s_kwargs)  # libraries set up their workspaces on the capture stream
        torch.cuda.current_stream(device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=self._pool, stream=stream):
            output = self.fn(*s_args, **s_kwargs)
        return _Captured(graph, inputs, output)

    def _ungraphable(self, key: tuple, why: str) -> None:
        self.graphs[key] = _UNGRAPHABLE
        if why not in self._warned:
            self._warned.add(why)
            log.warning("%s: not using a CUDA graph for this input: %s", self.name, why)


class GraphedForward(ForwardHook, CudaGraphs):
    """CUDA graphs over the forward underneath (compiled or not), as the module's named hook.

    Registered last on a component (``hooks.CUDA_GRAPHS``), so a capture runs everything below it,
    the compiled graphs included. ``fn``, what is captured, always calls the forward the registry
    has underneath this hook.
    """

    hook_name = CUDA_GRAPHS

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        ForwardHook.__init__(self, module)
        CudaGraphs.__init__(self, self._underneath, module, name)
        self.on_release: Optional[Callable[[], None]] = None

    def _underneath(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def release(self) -> None:
        """Remove the graphs (their memory pool goes with them); the forward underneath stays."""
        remove_hook(self.module, CUDA_GRAPHS)
        if self.on_release is not None:
            self.on_release()

    def __reduce__(self):  # as ``CompiledHook.__reduce__``: reached from saved graphs' guard state
        return (str, (f"<onediffx CUDA graphs of {self.name}>",))


def mark_passes(module: torch.nn.Module, compile_kwargs: Optional[dict[str, Any]]) -> None:
    """Ask DeepCache to capture its passes in CUDA graphs, compiled with ``torch.compile(**compile_kwargs)``.

    DeepCache replaces the UNet's forward by a per-step dispatcher, so the whole forward cannot be
    one graph; each of its two passes can.
    """
    PASS_GRAPHS.set(module, compile_kwargs)


def graph_module(module: torch.nn.Module, name: str) -> GraphedForward:
    """Install CUDA graphs over ``module``'s forward, as its outermost hook, and return them."""
    return add_hook(module, GraphedForward(module, name))
