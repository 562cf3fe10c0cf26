"""The LoRA benchmark runs end to end on the tiny SDXL (the GPU run uses the synthetic full SDXL)."""

from __future__ import annotations

import torch

from onediffx.bench.lora import run_lora_bench
from onediffx.models.tiny import tiny_sdxl


def test_lora_bench_on_tiny_sdxl(tmp_path):
    pipe = tiny_sdxl()
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    rows = run_lora_bench(pipe, "cpu", sizes_mb=(0.1, 0.2), tmp_dir=tmp_path)

    loads = [r for r in rows if r["kind"] == "load"]
    switches = [r for r in rows if r["kind"] == "switch"]
    assert [r["lora"] for r in loads] == ["lora1", "lora2"] and [r["adapters"] for r in switches] == ["1", "1..2"]
    assert loads[0]["rank"] < loads[1]["rank"] and loads[0]["file_mb"] < loads[1]["file_mb"]
    for row in loads:
        assert row["layers"] > 50 and row["unfuse_bit_exact"]
        assert row["max_abs_diff_vs_diffusers"] < 1e-5
        for key in ("diffusers_load_s", "diffusers_load_fuse_s", "onediffx_load_fuse_s", "floor_s"):
            assert row[key] > 0
    assert all(r["peft_set_adapters_fuse_s"] > 0 and r["onediffx_set_and_fuse_s"] > 0 for r in switches)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters()), "bench left weights changed"
    assert not list(tmp_path.iterdir()), "bench left files behind"
