"""``python -m onediffx bench`` end to end on the CPU with the tiny model (machinery, not speed)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli


def test_bench_writes_json_and_markdown_with_consistent_ratios(tmp_path):
    proc = run_cli("bench", "model=tiny", "model.synthetic=false", "compile=none", "bench.scenarios=[steady]",
                   "bench.peer_compile=false", "steps=2", "bench.repeat=2", "bench.unet_iters=1",
                   "bench.also_presets=[auto]", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    eager, onediffx, also, again = report["rows"]
    assert eager["method"] == "diffusers eager" and onediffx["method"] == "onediffx compile=none"
    assert also["method"] == "onediffx compile=auto" and also["psnr_vs_eager_db"] == float("inf")  # eager on the CPU
    assert again["method"].startswith("diffusers eager (again")  # measured last, on a fresh pipeline
    assert eager["unet_tflop"] >= 0 and eager["unet_step_ms"] > 0 and eager["unet_floor_ms"] > 0
    baseline = min(eager["e2e_s"], again["e2e_s"])  # speed-ups are against the faster eager measurement
    assert onediffx["speedup"] == pytest.approx(baseline / onediffx["e2e_s"], rel=1e-2)
    assert again["psnr_vs_eager_db"] == float("inf")  # same weights, same seed: the same image
    assert onediffx["psnr_vs_eager_db"] == float("inf")  # eager "compile": the very same image
    markdown = (tmp_path / "out" / "bench.md").read_text()
    assert "### steady" in markdown and "| diffusers eager |" in markdown and report["device_name"] in markdown


def test_unknown_scenario_is_one_line(tmp_path):
    proc = run_cli("bench", "model=tiny", "model.synthetic=false", "bench.scenarios=[fast]", cwd=tmp_path)
    assert proc.returncode == 2
    assert "onediffx: error: bench.scenarios[0]: unknown scenario 'fast'" in proc.stderr


def test_quantize_scenario_rows_carry_quality_against_the_unquantized_pipeline(tmp_path):
    """The quantize scenario on the CPU (int8, eager): each quantized row has its speed-ups and its
    PSNR/SSIM against onediffx unquantized, the reference the issue asks speed figures to carry."""
    proc = run_cli("bench", "model=tiny_xl", "model.synthetic=false", "compile=none", "bench.scenarios=[quantize]",
                   "bench.quantize_modes=[int8]", "bench.recipe_peer=false", "steps=2", "bench.repeat=1",
                   "bench.unet_iters=1", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    eager, off, int8 = rows
    assert [eager["method"], off["method"], int8["method"]] == \
        ["diffusers eager", "onediffx quantize=off compile=none", "onediffx quantize=int8 compile=none"]
    assert off["psnr_vs_eager_db"] == float("inf") and "psnr_vs_unquantized_db" not in off
    assert int8["quantized_layers"] > 0 and 20 < int8["psnr_vs_unquantized_db"] < float("inf")
    # int8 keeps the dtype: the same-dtype reference is the unquantized image itself, up to compile/eager
    assert int8["psnr_vs_unquantized_same_dtype_db"] == pytest.approx(int8["psnr_vs_unquantized_db"], abs=1.0)
    assert "same_dtype_reference" not in int8 and "psnr_vs_unquantized_same_dtype_db" not in off
    logged = [line for line in proc.stdout.splitlines() if line.startswith("bench quantize row:")]
    assert len(logged) == 3 and not [line for line in logged if "same_dtype_reference" in line]  # no arrays logged
    assert int8["speedup"] == pytest.approx(eager["e2e_s"] / int8["e2e_s"], rel=1e-2)
    assert int8["speedup_vs_recipe"] is None  # no recipe row asked for


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_serving_peer_fuses_each_lora_as_diffusers_applies_it_unfused(tmp_path, compiled):
    """The peer fuses the requested LoRA (no adapter branches in its compiled UNet); switching back and
    forth must give the images of diffusers' own unfused adapters (``set_adapters``), the oracle. Compiled
    too: ``pipe.unet = torch.compile(pipe.unet)`` hid the UNet from diffusers' ``fuse_lora`` and
    ``set_adapters`` (they skip what is not a ``ModelMixin``), so the H200 peer's UNet kept its unfused adapters."""
    import argparse
    import io

    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    from onediffx.bench.peer_server import Peer, PeerRequest, build
    from onediffx.bench.serve import _loras

    files = _loras(OmegaConf.create({"model": {"builtin": "tiny_xl", "synthetic": False}}), tmp_path)
    args = argparse.Namespace(arch="sdxl", builtin="tiny_xl", lora=[f"{n}={p}" for n, p in files.items()],
                              compile=False, mode=None)
    unfused = Peer(build(args), list(files), fuse=False)
    fused = Peer(build(argparse.Namespace(**{**vars(args), "compile": compiled})), list(files), fuse=True)
    for i, loras in enumerate([{"l1": 1.0}, {"l2": 1.0}, {"l1": 0.5, "l2": 1.0}, {"l1": 1.0}, {}]):
        req = PeerRequest(prompt="a red fox", size="64x64", steps=2, seed=i, loras=loras)
        got, want = (np.asarray(Image.open(io.BytesIO(p(req)[0])), dtype=np.int16) for p in (fused, unfused))
        assert np.abs(got - want).max() <= 2, loras
    first = PeerRequest(prompt="a red fox", size="64x64", steps=2, seed=0, loras={"l1": 1.0})
    plain = PeerRequest(prompt="a red fox", size="64x64", steps=2, seed=0, loras={})
    assert np.abs(np.asarray(Image.open(io.BytesIO(fused(first)[0])), dtype=np.int16)
                  - np.asarray(Image.open(io.BytesIO(fused(plain)[0])), dtype=np.int16)).max() > 2  # the LoRA acts
