"""What a run reports in ``metrics.json``: timings, speed, memory, versions, device."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("onediffx", "torch", "triton", "diffusers", "transformers", "peft", "hydra-core", "torchao",
            "accelerate", "nvidia-cudnn-frontend")


def versions() -> dict[str, str]:
    """Installed versions of what the numbers depend on; CUDA and cuDNN once torch is loaded (never
    imported here: ``onediffx list`` and config errors stay free of torch)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None and torch.version.cuda:
        found["cuda"] = torch.version.cuda
        found["cudnn"] = str(torch.backends.cudnn.version())
    return found


def latency_summary(seconds: list[float], images_per_call: int, steps: int) -> dict[str, Any]:
    """Median end-to-end latency per call and per image, and denoising steps per second."""
    median = statistics.median(seconds)
    return {
        "calls": len(seconds),
        "seconds_per_call": seconds,
        "median_seconds_per_call": median,
        "latency_per_image_s": median / images_per_call,
        "it_per_s": steps / median,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary name so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
