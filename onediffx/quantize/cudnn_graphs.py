"""cuDNN graph API plumbing shared by the 8-bit ops (``conv8``, ``attention8``).

Each op builds one cuDNN graph per shape (milliseconds, once) and executes it per call
(microseconds). The handle is bound to the caller's current stream on every call, because a CUDA
graph capture runs on a stream of its own; the workspace is allocated per call through PyTorch, so a
capture takes it from the graph's private pool.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch


class _Cache(threading.local):
    def __init__(self) -> None:
        self.handles: dict[int, Any] = {}
        self.plans: dict[tuple, Any] = {}


_CACHE = _Cache()


def handle_on_current_stream(device: torch.device) -> tuple[Any, Any]:
    """The ``cudnn`` module and this thread's handle for ``device``, bound to its current stream."""
    import cudnn

    index = device.index if device.index is not None else torch.cuda.current_device()
    handle = _CACHE.handles.get(index)
    if handle is None:
        with torch.cuda.device(index):
            handle = _CACHE.handles[index] = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    return cudnn, handle


def planned(key: tuple, make: Callable[[], Any]) -> Any:
    """The plan built for ``key`` in this thread, built by ``make`` the first time."""
    found = _CACHE.plans.get(key)
    if found is None:
        found = _CACHE.plans[key] = make()
    return found


def build(cudnn: Any, graph: Any) -> int:
    """Plan ``graph`` with cuDNN's heuristics (falling back to any engine that supports it); its
    workspace size in bytes."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph.get_workspace_size()


def execute(graph: Any, pack: dict, workspace_size: int, handle: Any, device: torch.device) -> None:
    workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=device)
    graph.execute(pack, workspace, handle=handle)
