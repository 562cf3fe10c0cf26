"""``parallel=cfg`` in the bench: one image's latency on two GPUs against one, in the same call.

Two runs of the real CLI on the same model, compile preset and graph cache: the one-process
pipeline, then ``parallel=cfg`` (which starts its second process itself). Each makes ``bench.repeat``
images after its warm-up; the row is the median seconds per image and the speed-up of the split
over the one-GPU pipeline. The graph cache is filled by the first run (batch of two) and the
second (batch of one per process) compiles its own shapes, so ``first_image_s`` is not a restart.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .cold_start import _env, _model_overrides, _timed_run, folder_for


def _run(cfg: DictConfig, work: Path, label: str, extra: list[str]) -> dict[str, Any]:
    run_dir = folder_for(work, label)
    cmd = [sys.executable, "-m", "onediffx", "run", *_model_overrides(cfg), f"compile={cfg.bench.compile_preset}",
           f"cache.dir={work / 'graphs'}", f"repeat={cfg.bench.repeat}", f"hydra.run.dir={run_dir}", *extra]
    proc, process_s = _timed_run(cmd, _env(work / "inductor"), cfg.bench.cold_start_timeout)
    if proc.returncode != 0:
        return {"scenario": "parallel", "method": label, "error": proc.stderr.strip().splitlines()[-1:]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"scenario": "parallel", "method": label, "e2e_s": round(metrics["median_seconds_per_call"], 4),
            "first_image_s": round(metrics["seconds_per_call"][0], 2), "process_s": round(process_s, 1),
            "peak_gib": metrics.get("peak_memory_gib")}


def run_parallel_bench(cfg: DictConfig) -> list[dict[str, Any]]:
    """Rows: the one-process pipeline, then ``parallel=cfg``, with the split's speed-up over it."""
    work = Path(tempfile.mkdtemp(prefix="onediffx-bench-parallel-"))
    rows = [_run(cfg, work, "onediffx one process", []), _run(cfg, work, "onediffx parallel=cfg", ["parallel=cfg"])]
    if all("e2e_s" in r for r in rows):
        rows[1]["speedup_vs_one_gpu"] = round(rows[0]["e2e_s"] / rows[1]["e2e_s"], 3)
    return rows
