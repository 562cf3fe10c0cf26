"""The real CLI in real processes: default run, sweep, list, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import job_dirs, run_cli


def test_default_run_writes_image_metrics_and_config(tmp_path):
    proc = run_cli("run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (job,) = job_dirs(tmp_path / "outputs")
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["model"] == "tiny"
    assert metrics["steps"] == 10 and metrics["it_per_s"] > 0 and metrics["peak_memory_gib"] > 0
    assert {"load", "lora-fuse", "deepcache", "compile", "warmup"} <= set(metrics["stages"])
    assert metrics["versions"]["diffusers"] and metrics["device"] == "cpu"
    image = Image.open(job / metrics["outputs"][0])
    assert image.size == (64, 64)
    assert "builtin: tiny" in (job / "config.yaml").read_text()
    assert "denoising" in proc.stderr  # the progress bar over steps


def test_sweep_writes_one_folder_per_job(tmp_path):
    proc = run_cli("run", "-m", "seed=0,1", "steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = job_dirs(tmp_path / "outputs" / "multirun")
    assert len(jobs) == 2
    seeds = [json.loads((j / "metrics.json").read_text())["seeds"] for j in jobs]
    assert sorted(seeds) == [[0], [1]]
    images = [Image.open(next(j.glob("image_*.png"))).tobytes() for j in jobs]
    assert images[0] != images[1]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("steps=0", "steps: 0 is not allowed; expected an integer from 1 to 1000"),
        ("height=63", "height: 63 is not allowed; expected a multiple of 8 from 8 to 16384"),
        ("stages=[lora-fuse,nope]", "stages[1]: unknown stage 'nope'"),
        ("stages=[warmup,compile,load-graph]", "stages: 'warmup' must come after 'compile' (it uses what compile "
         "leaves); list compile before warmup"),
        ("compile.regions=[1bad]", "compile.regions: '1bad' is not a class name"),
        ("model.path=/does/not/exist", "model.path: '/does/not/exist' does not exist"),
        ("guidance=abc", "guidance: Value 'abc' of type 'str' could not be converted to Float"),
        ("model=sdxl", "model.pretrained: 'stabilityai/stable-diffusion-xl-base-1.0' is not in the local Hugging Face cache"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, override, expected):
    proc = run_cli("run", override, cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onediffx: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "outputs").rglob("*.png"))


def test_full_error_shows_traceback(tmp_path):
    proc = run_cli("run", "steps=0", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_list_shows_models_stages_and_backends(tmp_path):
    proc = run_cli("list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for word in ("models:", "sdxl", "svd_xt", "controlnet_sd15", "stages:", "lora-fuse", "vae-tiling",
                 "compile backends:", "loras:"):
        assert word in proc.stdout


def test_a_run_ends_with_a_line_naming_its_folder(tmp_path):
    proc = run_cli("run", "steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("onediffx: wrote image_000_seed0.png, metrics.json to /") and "s per image" in last
    folder = Path(last.split(" to ", 1)[1].rsplit(" (", 1)[0])
    assert (folder / "image_000_seed0.png").is_file() and (folder / "metrics.json").is_file()
    assert not (folder / "onediffx.log").exists()  # nothing was logged: no empty log file


def test_a_config_error_imports_neither_torch_nor_diffusers_and_leaves_no_folder(tmp_path):
    """Checked in the process itself (its sys.modules), not with a timer."""
    script = ("import sys\nfrom onediffx.cli import main\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit as e:\n    print('EXIT', e.code, 'torch' in sys.modules, 'diffusers' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-c", script, "run", "steps=0", "hydra.run.dir=out"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "EXIT 2 False False", proc.stderr
    assert "steps: 0 is not allowed" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_list_does_not_import_diffusers(tmp_path):
    """Building the registry of stages and backends imports no model code (`onediffx list` in about 2 s)."""
    script = ("import sys\nfrom onediffx.cli import main\nmain(['list'])\n"
              "print('DIFFUSERS', 'diffusers' in sys.modules, 'transformers' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "vae-tiling" in proc.stdout and "inductor" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "DIFFUSERS False False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_one_line(tmp_path):
    proc = run_cli("run", "device=cuda", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("onediffx: error: device: 'cuda' is not available")
    assert not (tmp_path / "out").exists()


def test_a_sweep_whose_jobs_all_fail_exits_nonzero(tmp_path):
    proc = run_cli("run", "-m", "steps=0,-1", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 1
    assert "onediffx: error: all 2 jobs of the sweep failed" in proc.stderr


def test_run_help_is_short_and_lists_groups(tmp_path):
    proc = run_cli("run", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert len(lines) < 40 and any(l.startswith("model: ") and "tiny_xl" in l for l in lines)
    assert any("onediffx run -m" in l for l in lines)
