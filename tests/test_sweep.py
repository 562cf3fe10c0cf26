"""Sweeps: the summary files, their numbers against each job's own, baselines, launchers, GPU pinning."""

from __future__ import annotations

import csv
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import job_dirs, run_cli
from onediffx.errors import ConfigError
from onediffx.sweep.callback import SweepSummary
from onediffx.commands.gpus import concurrent_jobs, gpu_count, lease
from onediffx.sweep.summary import JobRow, choose_baseline


def read_csv(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def only_sweep_dir(tmp_path: Path) -> Path:
    (sweep,) = [p for p in (tmp_path / "outputs" / "multirun").iterdir() if p.is_dir()]
    return sweep


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_sweep_summary_matches_jobs_and_keeps_failed_rows(tmp_path):
    proc = run_cli("run", "-m", "guidance=7.5,1,-1", "steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sweep = only_sweep_dir(tmp_path)
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (sweep / name).stat().st_size > 0
    assert Image.open(sweep / "summary.png").size[0] > 100

    rows = read_csv(sweep)
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert [r["overrides"] for r in rows] == ["guidance=7.5", "guidance=1", "guidance=-1"]
    assert "guidance: -1.0 is not allowed" in rows[2]["error"] and rows[2]["latency_per_image_s"] == ""

    metrics = [json.loads((sweep / r["dir"] / "metrics.json").read_text()) for r in rows]
    for row, m in zip(rows[:2], metrics[:2]):
        for key in ("latency_per_image_s", "it_per_s", "peak_memory_gib"):
            assert float(row[key]) == m[key]
        assert float(row["startup_s"]) == m["startup"]["seconds"]
        assert row["compile"] == "off" and row["graph_cache"] == "off" and row["device"] == "cpu"
    base, changed = rows[0], rows[1]
    assert base["baseline"] == "True" and float(base["speedup"]) == 1.0
    assert float(changed["speedup"]) == metrics[0]["latency_per_image_s"] / metrics[1]["latency_per_image_s"]

    # Fidelity: the baseline against itself is identical; a changed guidance is not.
    assert math.isinf(float(base["psnr_db"])) and float(base["ssim"]) == 1.0
    ref = rgb(sweep / rows[0]["dir"] / metrics[0]["outputs"][0])
    img = rgb(sweep / rows[1]["dir"] / metrics[1]["outputs"][0])
    assert float(changed["psnr_db"]) == pytest.approx(peak_signal_noise_ratio(ref, img, data_range=255))
    assert float(changed["ssim"]) == pytest.approx(structural_similarity(ref, img, channel_axis=-1, data_range=255))
    assert 0 < float(changed["psnr_db"]) < 100 and int(changed["images_compared"]) == 1

    md = (sweep / "summary.md").read_text()
    assert "Baseline: job 0 (guidance=7.5)" in md and "identical" in md and "failed: guidance: -1.0" in md
    assert "Common overrides: `steps=2`" in md
    assert "sweep summary:" in proc.stdout


def test_joblib_launcher_runs_two_workers_and_numbered_baseline(tmp_path):
    proc = run_cli("run", "-m", "hydra/launcher=local_gpus", "seed=0,1", "steps=2", "sweep.baseline=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    sweep = only_sweep_dir(tmp_path)
    assert len(job_dirs(sweep)) == 2
    rows = read_csv(sweep)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["baseline"] for r in rows] == ["False", "True"]
    # Seeds differ, so nothing is comparable with the baseline but itself.
    assert rows[0]["psnr_db"] == "" and rows[0]["images_compared"] == "0"
    assert math.isinf(float(rows[1]["psnr_db"]))
    assert all(r["device"] == "cpu" for r in rows)  # no GPU visible: nothing pinned


def _row(num: int, *overrides: str, status: str = "ok") -> JobRow:
    return JobRow(num=num, path=Path("."), overrides=list(overrides), status=status)


def test_baseline_by_number_or_overrides():
    rows = [_row(0, "deepcache=off", "compile=none", status="failed"), _row(1, "deepcache=off", "compile=inductor"),
            _row(2, "deepcache=i3", "compile=inductor")]
    assert choose_baseline(rows, None)[0].num == 1  # first job that succeeded
    assert choose_baseline(rows, "2")[0].num == 2
    assert choose_baseline(rows, "compile=inductor deepcache=i3")[0].num == 2
    base, notes = choose_baseline(rows, "deepcache=off")
    assert base is None and "job 0 failed" in notes[-1]  # the first match failed
    base, notes = choose_baseline(rows, "deepcache=i9")
    assert base is None and "matches no job" in notes[0]


def test_unexpected_job_error_becomes_a_failed_row(tmp_path, capsys):
    config = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(tmp_path)}}})
    ret = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("CUDA out of memory"))
    SweepSummary().on_job_end(config=config, job_return=ret)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == {"status": "failed", "error": "RuntimeError: CUDA out of memory", "error_type": "RuntimeError"}
    assert ret.status == JobStatus.COMPLETED and ret.return_value == written  # the sweep goes on
    assert "RuntimeError: CUDA out of memory" in capsys.readouterr().err  # shown to the user, not swallowed


def test_gpu_pinning_follows_launcher_concurrency():
    assert concurrent_jobs(OmegaConf.create({"n_jobs": 4})) == 4
    assert concurrent_jobs(OmegaConf.create({"_target_": "basic"})) == 1
    assert gpu_count(None, concurrent=4, visible=2) == 2   # job n -> cuda:(n % 2)
    assert gpu_count(None, concurrent=1, visible=8) == 1   # sequential sweeps stay on one GPU
    assert gpu_count(3, concurrent=1, visible=4) == 3
    with pytest.raises(ConfigError, match="sweep.gpus: 4 GPUs asked for but 2 visible"):
        gpu_count(4, concurrent=4, visible=2)


def test_gpu_leases_go_to_free_gpus_and_come_back(tmp_path):
    folder = tmp_path / ".gpu-leases"
    with lease(folder, [0, 1]) as first:
        with lease(folder, [0, 1]) as second:  # job 2 asks for GPU 0 first; it is taken
            assert (first, second) == (0, 1)
        with lease(folder, [1, 0]) as third:  # GPU 1 was given back
            assert third == 1
    done = []

    def waiter():
        with lease(folder, [0], poll_s=0.01) as index:
            done.append(index)

    with lease(folder, [0]):
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.2)
        assert not done  # every GPU taken: the job waits rather than share one
    thread.join(timeout=5)
    assert done == [0]
