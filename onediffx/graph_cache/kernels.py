"""Inductor's compiled C++ kernels, bundled with the graphs that call them.

A saved graph holds the source of its CPU kernels, not the built libraries: loading it in a
process whose Inductor cache folder (``TORCHINDUCTOR_CACHE_DIR``) lacks them rebuilds every one
with the C++ compiler (tiny UNet: 42 kernels, 29 s instead of 3 s; a CPU SDXL restart took
200 s). So an entry also carries the ``.so`` files this process built, and loading puts back the
ones Inductor's folder is missing, where Inductor looks for them before compiling. (Triton
kernels for CUDA are already inside the graph artifact: Inductor bundles them.)
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Optional

from .manifest import KERNEL_TARGET

STARTED = time.time()
"""Kernels built after this (the import, before any compiling) are this process's."""


def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def _kernels(root: Path) -> dict[str, Path]:
    found = {}
    try:
        for path in root.glob("??/c*.so"):  # c<hash>.so, c<hash>.main.so
            target = path.relative_to(root).as_posix()
            if KERNEL_TARGET.fullmatch(target):
                found[target] = path
    except OSError:
        pass
    return found


def present() -> set[str]:
    """The kernels in Inductor's cache folder now (relative paths)."""
    return set(_kernels(inductor_cache_dir()))


def built_here() -> dict[str, Path]:
    """Kernels written to Inductor's cache folder since this process started compiling."""
    found = {}
    for target, path in _kernels(inductor_cache_dir()).items():
        try:
            if path.stat().st_mtime >= STARTED - 1:
                found[target] = path
        except OSError:
            continue
    return found


def mapped() -> Optional[dict[str, Path]]:
    """Kernels loaded into this process (``/proc/self/maps``); ``None`` where ``/proc`` is missing.

    Unlike the folder's contents, this is this process's alone: other processes sharing Inductor's
    folder (a parallel fill, a second replica) write kernels into it at any time.
    """
    root = inductor_cache_dir()
    prefix = os.path.realpath(root) + os.sep
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if ".so" in line}
    except OSError:
        return None
    found = {}
    for path in paths:
        if path.startswith(prefix):
            target = path[len(prefix):]
            if KERNEL_TARGET.fullmatch(target) and os.path.isfile(path):
                found[target] = Path(path)
    return found


def in_use() -> dict[str, Path]:
    """Kernels this process loaded or built: what its graphs call.

    Mapped libraries cover kernels that an earlier process built; built ones cover Inductor's
    ISA probes, which it loads in a subprocess. Where ``/proc`` is missing, built ones only.
    """
    return {**built_here(), **(mapped() or {})}


def restore(kernels: list[tuple[str, bytes]]) -> int:
    """Put bundled kernels that Inductor's cache folder lacks into it; returns how many."""
    root, restored = inductor_cache_dir(), 0
    for target, data in kernels:
        path = root / target
        if path.exists():
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
            restored += 1
        except OSError:
            continue  # Inductor builds it instead
    return restored
