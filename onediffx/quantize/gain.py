"""Whether each layer is faster in 8 bits on this device: measured, never assumed.

An 8-bit kernel pays for itself only at some shapes: on an H200, SDXL's fp8 matmuls ran 1.4x the
16-bit rate at its widths while the scaling around them cost more than that saved, and whether
cuDNN's 8-bit convolutions beat its 16-bit ones depends on the channels and the image size. So
``quantize.calibrate.min_speedup`` times each chosen layer's 16-bit form against the 8-bit form it
would get, at the input shape it saw during calibration, and leaves in high precision every layer
that is not at least that much faster.

Layers of one shape share a timing (SDXL's hundreds of layers have a few dozen shapes). On CUDA each
form is replayed from a CUDA graph, so launch overhead (which a compiled pipeline's CUDA graphs
remove too) does not count; the 8-bit form includes casting its input, which a compiled graph may
fuse into the producer, so the figure errs towards keeping 16 bits. The result is saved with the
calibration and reused on the same card, so every start quantizes the same layers and finds the same
compiled graphs.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch
from torch import nn

ITERS = 10
REPEATS = 5


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of one call of ``fn``: CUDA graph replays on CUDA, wall clock elsewhere."""
    if device.type == "cuda":
        from ..graph_timing import capture, replay_ms

        return statistics.median(replay_ms(capture(fn, ITERS), ITERS, REPEATS))
    for _ in range(2):
        fn()  # caches warm, kernels chosen
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _signature(module: nn.Module, shape: tuple[int, ...]) -> tuple:
    """What a layer's kernel time depends on: its kind, weight shape, geometry and input shape."""
    geometry = tuple(getattr(module, k, None) for k in ("stride", "padding", "dilation"))
    return type(module).__name__, tuple(module.weight.shape), geometry, module.bias is not None, shape


def measure_speedups(layers: Mapping[str, nn.Module], shapes: Mapping[str, tuple[int, ...]],
                     quantized_copy: Callable[[str, nn.Module], nn.Module]) -> dict[str, float]:
    """Each layer's 16-bit milliseconds over its 8-bit milliseconds at its calibration input shape.

    Layers without a recorded shape are left out (they keep the 8-bit form the other rules chose).
    """
    by_signature: dict[tuple, float] = {}
    found: dict[str, float] = {}
    with torch.no_grad():
        for name, module in layers.items():
            shape = shapes.get(name)
            if not shape:
                continue
            signature = _signature(module, tuple(shape))
            if signature not in by_signature:
                weight = module.weight
                x = torch.randn(shape, dtype=weight.dtype, device=weight.device)
                if x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                quantized = quantized_copy(name, module)
                high = _median_ms(lambda: module(x), weight.device)
                low = _median_ms(lambda: quantized(x), weight.device)
                by_signature[signature] = high / max(low, 1e-9)
                del quantized
            found[name] = by_signature[signature]
    return found
