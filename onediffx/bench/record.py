"""What makes a bench result a record someone else can trust and rerun.

A figure is only evidence with its provenance: the commit that produced it, when, on which card,
with which versions, and whether the GPU was the run's alone. ``provenance`` gathers the first four;
``GpuWatch`` samples the GPU's process list during the run, because a second process compiling or
serving on the same card (which happened: a graph-cache fill beside a timed row) slows the timed
kernels without leaving any other trace. ``record_path`` files a record under
``<root>/<date>-<card>/<scenario>.json``, the one naming scheme of ``benchmarks/results/``.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any, Optional

from ..metrics import versions

COMMIT_ENV = "ONEDIFFX_COMMIT"
"""A copy of the tree without ``.git`` (a GPU host the tree was copied to) names its commit here."""

_CARDS = re.compile(r"\b(h100|h200|h20|h800|a100|a10g?|l40s?|l4|b200|gb200|rtx ?\d{4}|v100|t4)\b", re.I)


def card_slug(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``; a CPU -> ``cpu``; else the name, lower-case and dashed."""
    if device_name.lower().startswith("cpu"):
        return "cpu"
    found = _CARDS.search(device_name)
    name = found.group(1) if found else device_name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit(repo: Path) -> tuple[Optional[str], Optional[bool]]:
    """The checkout's HEAD and whether tracked files differ from it; ``COMMIT_ENV`` where there is no git.

    Only a checkout of onediffx itself counts: an installed copy inside some other repository (a
    virtualenv in a project folder) must not report that repository's commit.
    """
    pyproject = repo / "pyproject.toml"
    if not (pyproject.is_file() and 'name = "onediffx"' in pyproject.read_text(encoding="utf-8")):
        return os.environ.get(COMMIT_ENV) or None, None
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=30)
            return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get(COMMIT_ENV) or None, None


def provenance(device_name: str, repo: Path, now: Optional[_dt.datetime] = None) -> dict[str, Any]:
    """Commit, UTC time, card and versions: the header every record carries."""
    commit, dirty = git_commit(repo)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return {"commit": commit, "dirty": dirty, "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device_name": device_name, "card": card_slug(device_name), "versions": versions()}


def record_path(root: Path, header: dict[str, Any], scenario: str) -> Path:
    """``<root>/<date>-<card>/<scenario>.json``: dated by the run's own UTC time."""
    return Path(root) / f"{header['time_utc'][:10]}-{header['card']}" / f"{scenario}.json"


def _ancestors(pid: int) -> set[int]:
    """``pid`` and its parents, read from ``/proc`` (a process the bench started counts as its own)."""
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


class GpuWatch:
    """Samples, in a thread, the compute processes on the bench's GPU that are not the bench's own.

    NVML (``nvidia-ml-py``, shipped with CUDA builds of PyTorch's wheels) lists every process on the
    card; a process is the bench's own when the bench's PID is among its ancestors (cold-start
    restarts are child processes). Off CUDA or without NVML, ``others`` stays ``None``: not known.
    """

    def __init__(self, device_index: Optional[int], interval_s: float = 0.5) -> None:
        self.others: Optional[dict[int, dict[str, Any]]] = None
        self.saw_self = False
        """Whether NVML listed this process: if never, its PIDs are another namespace's and tell nothing."""
        self._index, self._interval = device_index, interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "GpuWatch":
        if self._index is None:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = _nvml_handle(pynvml, self._index)
        except Exception:  # no NVML: say "not known" rather than "alone"
            return self
        self.others = {}
        self._thread = threading.Thread(target=self._sample, args=(pynvml, handle), daemon=True, name="gpu-watch")
        self._thread.start()
        return self

    def _sample(self, pynvml: Any, handle: Any) -> None:
        me = os.getpid()
        while True:
            try:
                procs = list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
                procs += list(pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
            except Exception:
                procs = []
            self.saw_self |= any(proc.pid == me for proc in procs)
            for proc in procs:
                if proc.pid != me and me not in _ancestors(proc.pid) and proc.pid not in self.others:
                    self.others[proc.pid] = {"pid": proc.pid, "name": _process_name(proc.pid),
                                             "used_mib": round((proc.usedGpuMemory or 0) / 2**20)}
            if self._stop.wait(self._interval):
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        """``gpu_alone``: True (sampled, nobody else), False (someone else, listed), None (not known)."""
        if self.others is None or not self.saw_self:
            return {"gpu_alone": None}
        return {"gpu_alone": not self.others, "gpu_others": sorted(self.others.values(), key=lambda p: p["pid"])}


def _nvml_handle(pynvml: Any, index: int) -> Any:
    """NVML's handle of torch's device ``index``, by PCI address: NVML numbers ignore CUDA_VISIBLE_DEVICES."""
    import torch

    props = torch.cuda.get_device_properties(index)
    try:
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
    except (AttributeError, pynvml.NVMLError):
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"  # another container's process: NVML sees it, /proc does not


def results_folder(root: Path) -> Path:
    """``<root>/<today>-<card>`` for the card this process sees (where ``make test-gpu`` files its junit)."""
    from ..device import device_name, resolve_device

    header = provenance(device_name(resolve_device("auto")), Path(__file__).resolve().parents[2])
    return record_path(root, header, "x").parent


if __name__ == "__main__":  # python -m onediffx.bench.record ROOT: print that folder
    import sys

    print(results_folder(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")))
