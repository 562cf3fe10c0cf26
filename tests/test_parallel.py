"""``parallel=cfg`` on the CPU: two real processes (gloo), started by one ``onediffx run``.

The oracle is the one-process run: each process computes one guidance half and both hold the
whole prediction after the exchange, so the image is the one-process image within the compiled
tolerance (a batch of one and a batch of two may sum in another order).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli


def _image(folder) -> np.ndarray:
    metrics = json.loads((folder / "metrics.json").read_text())
    return np.asarray(Image.open(folder / metrics["outputs"][0]), dtype=np.int16)


def test_two_processes_make_the_one_process_image(tmp_path):
    common = ("model=tiny_xl", "steps=3", "seed=5")
    split = run_cli("run", *common, "parallel=cfg", "hydra.run.dir=split", cwd=tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    alone = run_cli("run", *common, "hydra.run.dir=alone", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert np.abs(_image(tmp_path / "split") - _image(tmp_path / "alone")).max() <= 2
    stage = json.loads((tmp_path / "split" / "metrics.json").read_text())["stages"]["parallel"]
    assert stage["world_size"] == 2 and stage["rank"] == 0 and stage["backend"] == "gloo"


def test_a_call_without_guidance_halves_is_one_line_and_both_processes_end(tmp_path):
    proc = run_cli("run", "model=tiny_xl", "steps=2", "guidance=1.0", "parallel=cfg", cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "parallel=cfg: the denoiser got a batch of 1" in proc.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.rglob("*.png"))


def test_bad_parallel_options_are_one_line_before_anything_loads(tmp_path):
    proc = run_cli("run", "parallel=cfg", "parallel.world_size=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("onediffx: error: parallel.world_size=3")


def test_the_bench_times_the_split_against_one_process(tmp_path):
    proc = run_cli("bench", "model=tiny_xl", "model.synthetic=false", "compile=none", "bench.scenarios=[parallel]",
                   "steps=2", "bench.repeat=1", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, split = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert one["method"] == "onediffx one process" and split["method"] == "onediffx parallel=cfg"
    assert split["speedup_vs_one_gpu"] == round(one["e2e_s"] / split["e2e_s"], 3)


@pytest.mark.gpu
def test_two_gpus_with_compiled_graphs_make_the_one_gpu_image(tmp_path):
    """NCCL between cuda:0 and cuda:1, each half under its own compiled graphs and CUDA graphs."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    common = ("model=tiny_xl", "steps=3", "device=cuda", "compile=inductor", f"cache.dir={tmp_path / 'graphs'}")
    split = run_cli("run", *common, "parallel=cfg", "hydra.run.dir=split", cwd=tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    alone = run_cli("run", *common, "hydra.run.dir=alone", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert np.abs(_image(tmp_path / "split") - _image(tmp_path / "alone")).max() <= 2
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["stages"]["parallel"]["backend"] == "nccl"
