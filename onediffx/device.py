"""Choosing the device and dtype a run uses, and reading what it cost."""

from __future__ import annotations

import resource
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, model_dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` uses the model's dtype on an accelerator and float32 on the CPU, where half is slow."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else DTYPES[model_dtype]
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock times measure the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def empty_cache(device: torch.device) -> None:
    """Return cached blocks to the driver, so the next peak-memory reading starts from what is live."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
