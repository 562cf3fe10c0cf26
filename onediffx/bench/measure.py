"""Timing helpers shared by the bench scenarios: end-to-end calls, UNet steps, the FLOP floor."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from ..device import peak_memory_gib, reset_peak_memory, synchronize


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float) -> float:
    """PSNR in dB (scikit-image), ``inf`` for identical images: what a speed-up costs in fidelity."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(reference, image):
        return float("inf")
    return round(float(peak_signal_noise_ratio(reference, image, data_range=data_range)), 3)


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of one call, with the device's queue drained before and after."""
    return timed(fn, device)[0]


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def median_call(fn: Callable[[], Any], device: torch.device, repeat: int) -> dict[str, Any]:
    """Median seconds of ``repeat`` calls and the peak memory they reached; returns the last output."""
    reset_peak_memory(device)
    seconds, out = [], None
    for _ in range(repeat):
        s, out = timed(fn, device)
        seconds.append(s)
    return {"seconds": statistics.median(seconds), "all_seconds": seconds, "peak_gib": peak_memory_gib(device),
            "output": out}


class UNetProbe:
    """Captures one UNet call's inputs during a pipeline run, to time and count the UNet alone."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.args: tuple = ()
        self.kwargs: dict = {}
        self._handle = unet.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        if not self.kwargs and not self.args:
            self.args, self.kwargs = args, kwargs
        self._handle.remove()

    def step_seconds(self, unet: Callable, device: torch.device, iters: int) -> float:
        with torch.no_grad():
            for _ in range(2):
                unet(*self.args, **self.kwargs)
            seconds, _ = timed(lambda: [unet(*self.args, **self.kwargs) for _ in range(iters)], device)
        return seconds / iters

    def flops(self, unet: torch.nn.Module) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(*self.args, **self.kwargs)
        return int(counter.get_total_flops())


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """What this card sustains on a large matmul in ``dtype``: the realistic floor's denominator."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    iters = 20 if device.type == "cuda" else 3
    seconds, _ = timed(lambda: [a @ b for _ in range(iters)], device)
    return 2 * n**3 * iters / seconds / 1e12


def attention_kernels(choice: str, device: torch.device, tokens: int = 4096) -> set[str]:
    """Names of the attention kernels one compiled diffusers ``Attention`` launches under
    ``compile.attention=choice`` (SDXL's 640-wide, 10-head self-attention): which kernel the
    priority really traced into the graph, read from the profiler rather than assumed."""
    from diffusers.models.attention_processor import Attention

    from ..compile.backends import compile_kwargs
    from ..compile.config import CompileConfig
    from ..compile.dispatch import CompiledForward

    attn = Attention(640, heads=10, dim_head=64).to(device, torch.float16)
    compiled = CompiledForward(attn, compile_kwargs(CompileConfig(backend="inductor")), attention=choice)
    x = torch.randn(2, tokens, 640, device=device, dtype=torch.float16)
    with torch.no_grad():
        compiled(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            compiled(x)
            synchronize(device)
    marks = ("attn", "sdpa", "flash", "cudnn", "fmha")
    return {e.name for e in prof.events() if any(m in e.name.lower() for m in marks)}
