"""What a compiled graph depends on: the fields of a cache key, and the key's folder name.

A loaded graph is only a hit if it runs without compiling anything, so the key holds every
process-wide setting that Dynamo's saved guards or Inductor's generated code depend on, not just
versions and the card:

* thread count: the saved graphs keep Dynamo's ``GLOBAL_STATE`` guard, which checks
  ``torch.get_num_threads()``, and Inductor's CPU kernels are specialised on it. A graph saved
  with 2 threads fails that guard in a process started with ``OMP_NUM_THREADS=1`` and compiles
  again at the first call (the probe's "hit that compiles").
* the rest of that guard's process state: default dtype, deterministic algorithms, reduced
  precision matmul flags.
* the CPU's vector ISA (``torch.backends.cpu.get_cpu_capability()``), which Inductor's C++
  kernels are built for.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch is imported where a key is made: the cache folder itself needs no torch
    import torch

FORMAT = 3
"""2: graphs carry only portable guards (see compile/guards.py). 3: process state in the key,
signed manifests (trust.py), bundled C++ kernels."""

PER_CALL_STATE = ("grad_mode", "autocast_state", "torch_function", "torch_function_all_disabled")
"""Fields of Dynamo's global-state guard that a pipeline sets per call, not per process."""


def _version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def process_state() -> dict[str, Any]:
    """The process-wide part of Dynamo's global-state guard, which every saved graph keeps."""
    import torch

    try:  # the guard's own view (torch >= 2.8), so nothing it checks can be missed here
        state = json.loads(torch._C._dynamo.guards.GlobalStateGuard().__getstate__())
        if isinstance(state, dict) and "num_threads" in state:
            return {k: v for k, v in sorted(state.items()) if k not in PER_CALL_STATE}
    except (AttributeError, TypeError, ValueError, RuntimeError):
        pass
    matmul = torch.backends.cuda.matmul
    return {
        "num_threads": torch.get_num_threads(),
        "default_dtype": str(torch.get_default_dtype()),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_algorithms_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "allow_tf32": bool(matmul.allow_tf32),
        "allow_fp16_reduce": bool(matmul.allow_fp16_reduced_precision_reduction),
        "allow_bf16_reduce": bool(matmul.allow_bf16_reduced_precision_reduction),
    }


def environment_key(device: torch.device) -> dict[str, Any]:
    """What makes compiled code from one machine or process invalid in another."""
    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device": gpu or f"cpu-{platform.machine()}",
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "diffusers": _version("diffusers"),
        "process": process_state(),
    }


def config_digest(module: torch.nn.Module) -> str:
    """A digest of the component's architecture: its diffusers config, else its module tree."""
    config = getattr(module, "config", None)
    if config is None:
        text = repr(module)
    else:  # private keys ("_use_default_values", "_name_or_path") vary by process and origin
        text = json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def canonical(value: Any) -> str:
    """One JSON text per value, the same before and after a round trip through a manifest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
