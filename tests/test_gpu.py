"""GPU checks (``pytest -m gpu`` on the GPU machine; skipped without CUDA).

The CPU suite covers the logic; these check what only CUDA exercises: fp16 weights with the bf16
VAE of the ``inductor`` preset, Triton kernels in saved graphs, and a restart on the same card.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _image(job):
    metrics = json.loads((job / "metrics.json").read_text())
    return metrics, np.asarray(Image.open(job / metrics["outputs"][0]), dtype=np.float64)


def test_compiled_fp16_run_restarts_from_the_graph_cache_on_cuda(tmp_path):
    from skimage.metrics import peak_signal_noise_ratio

    common = ["run", "model=tiny_xl", "device=cuda", "dtype=float16", "steps=4", f"cache.dir={tmp_path / 'graphs'}"]
    eager = run_cli(*common, "compile=none", "hydra.run.dir=eager", cwd=tmp_path)
    cold = run_cli(*common, "compile=inductor", "hydra.run.dir=cold", cwd=tmp_path)
    warm = run_cli(*common, "compile=inductor", "hydra.run.dir=warm", cwd=tmp_path)
    for proc in (eager, cold, warm):
        assert proc.returncode == 0, proc.stderr
    (_, reference), (cold_m, cold_img), (warm_m, warm_img) = (_image(tmp_path / d) for d in ("eager", "cold", "warm"))
    assert cold_m["compile_counters"]["graphs_compiled"] >= 2  # UNet and VAE decoder
    assert warm_m["stages"]["load-graph"]["hit"] and warm_m["compile_counters"]["graphs_compiled"] == 0
    assert warm_m["compile_counters"]["dynamo_graphs"] == 0
    assert np.abs(warm_img - cold_img).max() <= 1
    assert peak_signal_noise_ratio(reference, cold_img, data_range=255) > 30  # bf16 VAE, compiled kernels
