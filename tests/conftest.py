"""Shared fixtures: Hydra composition over the real conf/, and the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from onediffx.resources import conf_dir
from onediffx.config import register_configs

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _junit_provenance(request, record_testsuite_property):
    """A junit file (``make test-gpu``) carries the commit, time, card and versions it tested."""
    if not request.config.getoption("xmlpath", None):
        return
    from onediffx.bench.record import provenance
    from onediffx.device import device_name, resolve_device

    for key, value in provenance(device_name(resolve_device("auto")), REPO).items():
        record_testsuite_property(key, value if isinstance(value, str) else json.dumps(value))


@pytest.fixture(scope="session")
def compose_run():
    """Compose ``conf/run.yaml`` with overrides, exactly as the CLI does (schema included)."""
    register_configs()

    def _compose(*overrides: str, config_name: str = "run"):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))

    return _compose


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m onediffx ...`` in a fresh process, outputs under ``cwd``."""
    inherited = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    path = os.pathsep.join(p for p in (str(REPO), inherited.get("PYTHONPATH", "")) if p)  # keep the caller's site dirs
    full_env = {**inherited, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "onediffx", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


def job_dirs(root: Path) -> list[Path]:
    """Folders that hold a metrics.json under ``root`` (one per job)."""
    return sorted(p.parent for p in root.rglob("metrics.json"))


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)
