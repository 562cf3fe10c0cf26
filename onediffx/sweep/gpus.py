"""Which GPU a sweep job runs on.

Hydra's joblib launcher runs jobs in reused worker processes, so ``CUDA_VISIBLE_DEVICES`` cannot be
set per job (CUDA reads it once per process). Choosing ``cuda:N`` from the job number works in any
worker and any launcher: with ``G`` GPUs, job ``n`` runs on ``cuda:(n % G)``. ``G`` defaults to the
number of jobs the launcher runs at once (``hydra.launcher.n_jobs``, capped by the GPUs visible), so
concurrent jobs never share a GPU and a sequential sweep stays on one GPU, where its timings compare.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
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


def job_device(cfg: DictConfig) -> Optional[str]:
    """The device this job is pinned to, or ``None`` to leave ``cfg.device`` as it is.

    Only ``device=auto`` jobs of a multirun are pinned: an explicit device always wins.
    """
    if cfg.device != "auto" or cfg.sweep.gpus == 0 or not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    gpus = gpu_count(cfg.sweep.gpus, concurrent_jobs(hydra_cfg.launcher), torch.cuda.device_count())
    return f"cuda:{int(hydra_cfg.job.num) % gpus}" if gpus >= 1 and torch.cuda.is_available() else None
