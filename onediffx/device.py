"""Choosing the device and dtype a run uses, and reading what it cost."""

from __future__ import annotations

import resource
import sys

from typing import Optional

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


def allocated_gib(device: torch.device) -> Optional[float]:
    """GPU memory torch holds now (live tensors, CUDA-graph pools included); ``None`` off the GPU."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def empty_cache(device: torch.device) -> None:
    """Return cached blocks to the driver, so the next peak-memory reading starts from what is live."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


ACTIVATION_BYTES_PER_PIXEL = 256
"""A lower bound on the activation memory one image costs per pixel in half precision, with
classifier-free guidance doubling the batch (SDXL at 1024² needs about three times this). A lower
bound, so the check refuses only what cannot fit, never what might."""


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give: the CUDA driver's free memory plus what torch holds cached
    but unused; on the CPU, the kernel's MemAvailable (the process's own pages are not counted)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def activation_bytes(dtype: torch.dtype, height: int, width: int, images: int) -> int:
    """The least activation memory one call of ``images`` images needs (classifier-free guidance
    doubles the batch; float32 doubles the bytes): what ``check_memory`` and the server's
    per-request check compare with the memory free."""
    return height * width * images * 2 * ACTIVATION_BYTES_PER_PIXEL * (2 if dtype == torch.float32 else 1)


def check_memory(device: torch.device, dtype: torch.dtype, height: int, width: int, images: int,
                 key: str = "height, width, num_images") -> None:
    """Refuse, before the model loads, a call whose activations cannot fit in the device's memory:
    ``height=width=100000`` should be one line now, not an allocator error minutes later."""
    need = activation_bytes(dtype, height, width, images)
    have = free_memory(device)
    if need > have:
        raise ConfigError(
            f"{key}: {width}x{height} x {images} image(s) needs at least {need / 2**30:.1f} GiB for activations, "
            f"and {device} has {have / 2**30:.1f} GiB free; lower the size or the images per call"
        )
