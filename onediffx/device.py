"""Choosing the device and dtype a run uses, and reading what it cost."""

from __future__ import annotations

import resource
import sys

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; a device this torch cannot
    use is a ``ConfigError`` now, not an assertion deep inside the model load."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
            raise ConfigError(f"device: {name!r} is not available (torch {torch.__version__} is {build}); "
                              "use device=auto or device=cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name!r} does not exist; this machine has {torch.cuda.device_count()} "
                              "GPU(s), cuda:0 to cuda:" + str(torch.cuda.device_count() - 1))
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device: 'mps' is not available on this machine; use device=auto or device=cpu")
    return device


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
