"""One row per sweep job: its overrides, speed, memory, start-up, and fidelity to the baseline.

A sweep is run to choose a setting, so each row answers "how much faster, at what cost in image
quality" against one baseline job. Everything is read back from what the jobs wrote
(``metrics.json``, ``.hydra/``, the images), so a summary can be rebuilt from a sweep folder at any
time and its numbers are the jobs' own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from ..startup import cache_status, compile_status

ImageKey = tuple[str, Optional[str], int, int]
"""(prompt, negative prompt, seed, frame): images with equal keys are comparable across jobs."""


@dataclass
class JobRow:
    num: int
    path: Path
    overrides: list[str]
    status: str
    error: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    speedup: Optional[float] = None
    psnr_db: Optional[float] = None
    ssim: Optional[float] = None
    images_compared: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def metric(self, key: str) -> Any:
        return self.metrics.get(key)

    @property
    def startup(self) -> dict[str, Any]:
        """Start-up facts; derived from the stage facts for jobs written before ``startup`` existed."""
        if "startup" in self.metrics:
            return self.metrics["startup"]
        stages = self.metrics.get("stages", {})
        return {"compile": compile_status(stages, "?"), "graph_cache": cache_status(stages)} if stages else {}


@dataclass
class Summary:
    rows: list[JobRow]
    baseline: Optional[JobRow]
    common: list[str]
    """Overrides every job shares (shown once, not on every row)."""
    notes: list[str]


def _job_num(job_dir: Path, fallback: int) -> int:
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num", default=None)
        if isinstance(num, int):
            return num
    return fallback


def read_job(job_dir: Path, fallback_num: int) -> JobRow:
    """A row from one job folder; a job that wrote no ``metrics.json`` is a failed row."""
    overrides = [str(o) for o in OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))]
    num = _job_num(job_dir, fallback_num)
    metrics_file = job_dir / "metrics.json"
    if not metrics_file.is_file():
        return JobRow(num, job_dir, overrides, "failed", "no metrics.json: the job stopped before it finished")
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    status = metrics.get("status", "failed")
    return JobRow(num, job_dir, overrides, status, metrics.get("error"), metrics)


def read_jobs(sweep_dir: Path) -> list[JobRow]:
    """Every job folder under the sweep folder (any ``hydra.sweep.subdir`` layout), by job number."""
    job_dirs = sorted({p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra"})
    rows = [read_job(d, i) for i, d in enumerate(job_dirs)]
    return sorted(rows, key=lambda r: r.num)


def choose_baseline(rows: list[JobRow], spec: Optional[str]) -> tuple[Optional[JobRow], list[str]]:
    """The baseline job: ``spec`` is a job number or whitespace-separated overrides it must carry."""
    if spec is None or str(spec).strip() == "":
        first = next((r for r in rows if r.ok), None)
        return first, [] if first else ["no job succeeded, so nothing is compared"]
    spec = str(spec).strip()
    if spec.isdigit():
        found = [r for r in rows if r.num == int(spec)]
    else:
        wanted = set(spec.split())
        found = [r for r in rows if wanted <= set(r.overrides)]
    if not found:
        return None, [f"sweep.baseline={spec!r} matches no job; give a job number or overrides one job has"]
    notes = [f"sweep.baseline={spec!r} matches jobs {[r.num for r in found]}; using job {found[0].num}"] \
        if len(found) > 1 else []
    if not found[0].ok:
        notes.append(f"baseline job {found[0].num} failed, so nothing is compared")
        return None, notes
    return found[0], notes


def _images(row: JobRow) -> dict[ImageKey, Path]:
    return {
        (i["prompt"], i.get("negative_prompt"), int(i["seed"]), int(i.get("frame", 0))): row.path / i["file"]
        for i in row.metrics.get("images", [])
    }


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def fidelity(row: JobRow, baseline: JobRow) -> tuple[Optional[float], Optional[float], int]:
    """PSNR (dB, over all matched pixels: infinite when identical) and mean SSIM against the baseline.

    Images are matched by prompt, negative prompt and seed, so a sweep over seeds compares nothing
    and a sweep over settings compares like with like.
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ours, theirs = _images(row), _images(baseline)
    pairs = [(_load(theirs[k]), _load(p)) for k, p in ours.items() if k in theirs and theirs[k].is_file() and p.is_file()]
    pairs = [(a, b) for a, b in pairs if a.shape == b.shape]
    if not pairs:
        return None, None, 0
    refs, tests = np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])
    with np.errstate(divide="ignore"):
        psnr = float(peak_signal_noise_ratio(refs, tests, data_range=255))
    win = min(7, *(min(a.shape[:2]) for a, _ in pairs))
    win -= 1 - win % 2  # odd, as SSIM's window must be
    ssim = float(np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=win) for a, b in pairs]))
    return psnr, ssim, len(pairs)


def summarize(sweep_dir: Path, baseline_spec: Optional[str] = None) -> Summary:
    """Read every job, pick the baseline, and fill in speed-up and fidelity."""
    rows = read_jobs(sweep_dir)
    baseline, notes = choose_baseline(rows, baseline_spec)
    common = sorted(set.intersection(*(set(r.overrides) for r in rows))) if rows else []
    if baseline is not None:
        baseline.baseline = True
        base_latency = baseline.metric("latency_per_image_s")
        for row in rows:
            if not row.ok:
                continue
            latency = row.metric("latency_per_image_s")
            if base_latency and latency:
                row.speedup = base_latency / latency
            row.psnr_db, row.ssim, row.images_compared = fidelity(row, baseline)
    return Summary(rows, baseline, common, notes)


def label(row: JobRow, common: list[str]) -> str:
    """The overrides that set this job apart from the others."""
    own = [o for o in row.overrides if o not in common]
    return " ".join(own) if own else "(no overrides)"


def is_identical(psnr: Optional[float]) -> bool:
    return psnr is not None and math.isinf(psnr)
