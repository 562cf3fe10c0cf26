"""Timing GPU work as a compiled pipeline runs it: replayed from a CUDA graph, not launched from Python.

The kernels the benchmark scripts and ``quantize.calibrate.min_speedup`` compare take microseconds;
timed from Python launches they would measure the host. ``capture`` warms ``fn`` on a side stream (allocator and library workspaces settle) and
records ``per_graph`` calls into one graph; ``replay_ms`` times replays of it, per call.
"""

from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], object], per_graph: int) -> torch.cuda.CUDAGraph:
    """``per_graph`` calls of ``fn`` in one CUDA graph, after warming it on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph, per_graph: int, reps: int) -> list[float]:
    """Milliseconds per call of each of ``reps`` replays."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per_graph)
    return times
