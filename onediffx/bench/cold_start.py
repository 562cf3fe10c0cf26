"""Cold start and restart, each in a fresh process: onediffx's graph cache against plain Inductor.

Five processes on empty caches of their own: onediffx cold (compiles, saves), onediffx restart
(loads the graph cache) through the CLI and through the Python API (``compile_pipe`` +
``load_pipe``, see ``library_start``), plain torch.compile cold, plain torch.compile restart (warm
Inductor caches). "First image" is measured from the model being loaded to the first full image done; ``process_s``
is the whole process, interpreter start to exit (imports, load, warm-up, images, writing outputs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[2]


def _env(inductor_dir: Path) -> dict[str, str]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for key in ("ONEDIFFX_FULL_ERROR", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    return env


def _timed_run(cmd: list[str], env: dict[str, str], timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def _model_overrides(cfg: DictConfig) -> list[str]:
    from ..generate import Settings

    model, run = cfg.model, Settings.from_config(cfg)
    out = [f"model={model.name}", f"model.synthetic={str(model.synthetic).lower()}"]
    return out + [f"height={run.height}", f"width={run.width}", f"steps={run.steps}"]


def folder_for(work: Path, label: str) -> Path:
    """A run folder named after a row's label (Hydra's overrides take no spaces or ``=`` in a path)."""
    return work / "".join(c if c.isalnum() else "-" for c in label)


def _onediffx(cfg: DictConfig, work: Path, label: str, timeout: int) -> dict[str, Any]:
    run_dir = folder_for(work, label)
    cmd = [sys.executable, "-m", "onediffx", "run", *_model_overrides(cfg), f"compile={cfg.bench.compile_preset}",
           f"cache.dir={work / 'graphs'}", f"hydra.run.dir={run_dir}"]
    proc, process_s = _timed_run(cmd, _env(work / "inductor-onediffx"), timeout)
    if proc.returncode != 0:
        return {"scenario": "cold_start", "method": label, "error": proc.stderr.strip().splitlines()[-1:]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = metrics["stages"]
    after_load = sum(f.get("seconds", 0.0) for n, f in stages.items() if n != "load" and f.get("enabled", True))
    return {
        "scenario": "cold_start", "method": label, "load_s": round(stages["load"]["seconds"], 2),
        "first_image_s": round(after_load + metrics["seconds_per_call"][0], 2),
        "process_s": round(process_s, 2),
        "graph_cache": metrics["startup"]["graph_cache"], "graphs_compiled": metrics["compile_counters"]["graphs_compiled"],
        "compile_s": {k: round(sum(v), 1) for k, v in metrics["compile_counters"].get("compile_seconds", {}).items()},
        "stages_s": {n: round(f.get("seconds", 0.0), 2) for n, f in stages.items()
                     if f.get("enabled", True) and "seconds" in f},
        **({"background_compile_s": stages["progressive"].get("background_s")} if "progressive" in stages else {}),
    }


def _script(module: str, cfg: DictConfig, *extra: str) -> list[str]:
    """``python -m <module>`` with the bench's model and call settings, as the bench scripts take them."""
    from ..generate import Settings

    model, run = cfg.model, Settings.from_config(cfg)
    source = ["--builtin", model.builtin] if model.builtin else ["--arch", model.arch]
    return [sys.executable, "-m", module, *source, "--height", str(run.height),
            "--width", str(run.width), "--steps", str(run.steps), *extra]


def _library(cfg: DictConfig, work: Path, label: str, timeout: int) -> dict[str, Any]:
    """OneDiffX's restart snippet on the graphs the onediffx CLI rows saved (same Inductor folder)."""
    cmd = _script("onediffx.bench.library_start", cfg, "--cache-dir", str(work / "graphs"),
                  "--preset", cfg.bench.compile_preset)
    proc, process_s = _timed_run(cmd, _env(work / "inductor-onediffx"), timeout)
    if proc.returncode != 0:
        return {"scenario": "cold_start", "method": label, "error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"scenario": "cold_start", "method": label, "load_s": round(result["load_s"], 2),
            "first_image_s": round(result["first_image_s"], 2), "process_s": round(process_s, 2),
            "graph_cache": "hit" if result["hit"] else "miss", "graphs_compiled": result["graphs_compiled"],
            "stages_s": {"compile_pipe": round(result["compile_pipe_s"], 2), "load_pipe": round(result["load_pipe_s"], 2)}}


def _peer(cfg: DictConfig, work: Path, label: str, timeout: int) -> dict[str, Any]:
    cmd = _script("onediffx.bench.peer_start", cfg)
    proc, process_s = _timed_run(cmd, _env(work / "inductor-peer"), timeout)
    if proc.returncode != 0:
        return {"scenario": "cold_start", "method": label, "error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"scenario": "cold_start", "method": label, "load_s": round(result["load_s"], 2),
            "first_image_s": round(result["first_image_s"], 2), "process_s": round(process_s, 2)}


def run_cold_start(cfg: DictConfig) -> list[dict[str, Any]]:
    """Rows for the five restarts; each process gets the bench's timeout."""
    timeout = cfg.bench.cold_start_timeout
    with tempfile.TemporaryDirectory(prefix="onediffx-coldstart-") as tmp:
        work = Path(tmp)
        rows = [
            _onediffx(cfg, work, "onediffx cold (compile + save)", timeout),
            _onediffx(cfg, work, "onediffx restart (graph cache)", timeout),
            _library(cfg, work, "onediffx library restart (compile_pipe + load_pipe)", timeout),
        ]
        if cfg.bench.peer_compile and cfg.bench.cold_start_peers:
            rows += [
                _peer(cfg, work, "torch.compile cold", timeout),
                _peer(cfg, work, "torch.compile restart (warm Inductor cache)", timeout),
            ]
    return rows
