"""Which GPU a sweep job runs on.

Hydra's joblib launcher runs jobs in reused worker processes, so ``CUDA_VISIBLE_DEVICES`` cannot be
set per job (CUDA reads it once per process). Instead each job leases one of ``G`` GPUs for as long
as it runs, through a lock file per GPU in the sweep folder (``.gpu-leases/cuda<i>.lock``): it
takes the first free one, starting from ``cuda:(n % G)`` for job ``n``, and waits when all are
taken. ``G`` defaults to the number of jobs the launcher runs at once (``hydra.launcher.n_jobs``,
capped by the GPUs visible), so concurrent jobs never share a GPU and a sequential sweep stays on
one GPU, where its timings compare.

Why leases rather than ``cuda:(n % G)`` alone: jobs differ in length (an eager baseline takes three
times a DeepCache job), and a fixed assignment left one H200 busy for 56 s and the other for 24 s
in a four-job sweep; with leases a GPU takes the next job as soon as it is free.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError


def concurrent_jobs(launcher: Any) -> int:
    """How many jobs the launcher runs at once: joblib's ``n_jobs`` (``-1``: one per CPU), else 1."""
    n_jobs = OmegaConf.select(launcher, "n_jobs", default=None) if launcher is not None else None
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


def gpu_count(requested: Optional[int], concurrent: int, visible: int) -> int:
    """The ``G`` of ``cuda:(n % G)``; 0 or 1 means no pinning is needed."""
    if requested is None:
        return min(concurrent, visible)
    if requested > visible:
        raise ConfigError(
            f"sweep.gpus: {requested} GPUs asked for but {visible} visible; "
            f"set sweep.gpus to at most {visible} (0 turns pinning off) or device=cpu"
        )
    return requested


def _pinned_gpus(cfg: DictConfig) -> int:
    """``G`` for this job, or 0 when it is not pinned (not a multirun, explicit device, no CUDA)."""
    if cfg.device != "auto" or cfg.sweep.gpus == 0 or not HydraConfig.initialized():
        return 0
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or not torch.cuda.is_available():
        return 0
    return gpu_count(cfg.sweep.gpus, concurrent_jobs(hydra_cfg.launcher), torch.cuda.device_count())


@contextmanager
def lease(folder: Path, order: Sequence[int], poll_s: float = 0.2) -> Iterator[int]:
    """Hold the first free index of ``order`` (a lock file each in ``folder``) until the block ends.

    The locks are ``flock``s: the OS drops them when a worker dies, so a crashed job never keeps
    its GPU leased.
    """
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for index in order:
            lock = FileLock(str(folder / f"cuda{index}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                yield index
            finally:
                lock.release()
            return
        time.sleep(poll_s)


@contextmanager
def job_device(cfg: DictConfig) -> Iterator[Optional[str]]:
    """The device this job runs on while the block lasts, or ``None`` to leave ``cfg.device`` as is.

    Only ``device=auto`` jobs of a multirun are pinned: an explicit device always wins.
    """
    gpus = _pinned_gpus(cfg)
    if gpus < 1:
        yield None
        return
    hydra_cfg = HydraConfig.get()
    first = int(hydra_cfg.job.num) % gpus
    with lease(Path(hydra_cfg.sweep.dir) / ".gpu-leases", [(first + i) % gpus for i in range(gpus)]) as index:
        yield f"cuda:{index}"
