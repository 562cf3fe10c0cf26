"""The LoRA benchmark runs end to end on the tiny SDXL and FLUX (the GPU run uses the synthetic full models)."""

from __future__ import annotations

import pytest
import torch

from onediffx.bench.lora import run_lora_bench
from onediffx.denoiser import denoiser
from onediffx.models.tiny import tiny_flux, tiny_sdxl


@pytest.mark.parametrize("build", [tiny_sdxl, tiny_flux], ids=["sdxl", "flux"])
def test_lora_bench_on_tiny_models(build, tmp_path):
    pipe = build()
    before = {n: p.detach().clone() for n, p in denoiser(pipe).named_parameters()}
    rows = run_lora_bench(pipe, "cpu", sizes_mb=(0.1, 0.2), tmp_dir=tmp_path)

    loads = [r for r in rows if r["kind"] == "load"]
    switches = [r for r in rows if r["kind"] == "switch"]
    assert [r["lora"] for r in loads] == ["lora1", "lora2"] and [r["adapters"] for r in switches] == ["1", "1..2"]
    assert loads[0]["rank"] < loads[1]["rank"] and loads[0]["file_mb"] < loads[1]["file_mb"]
    for row in loads:
        assert row["layers"] > 40 and row["unfuse_bit_exact"]
        assert row["max_abs_diff_vs_diffusers"] < 1e-5
        for key in ("diffusers_load_s", "diffusers_load_fuse_s", "onediffx_load_fuse_s", "floor_s"):
            assert row[key] > 0
    assert all(r["peft_set_adapters_fuse_s"] > 0 and r["onediffx_set_and_fuse_s"] > 0 for r in switches)
    after = dict(denoiser(pipe).named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items()), "bench left weights changed"
    assert not list(tmp_path.iterdir()), "bench left files behind"
