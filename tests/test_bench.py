"""``python -m onediffx bench`` end to end on the CPU with the tiny model (machinery, not speed)."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_cli


def _assert_provenance(report: dict, root, name: str) -> None:
    """The record names the commit of this checkout, its UTC time and card, and is filed by date and card."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert report["commit"] == head and re.fullmatch(r"[0-9a-f]{40}", head)
    when = dt.datetime.strptime(report["time_utc"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 900
    assert report["card"] == "cpu" and report["versions"]["torch"] and report["scenario"] == name
    assert report["gpu_alone"] is None and report["headline"] is False  # a CPU has no GPU process list to read
    filed = root / "results" / f"{report['time_utc'][:10]}-cpu" / f"{name}.json"
    assert json.loads(filed.read_text()) == report
    assert f"commit {head}" in filed.with_suffix(".md").read_text()


def test_bench_writes_json_and_markdown_with_consistent_ratios(tmp_path):
    proc = run_cli("bench", "model=tiny", "model.synthetic=false", "compile=none", "bench.scenarios=[steady]",
                   "bench.peer_compile=false", "steps=2", "bench.repeat=2", "bench.unet_iters=1",
                   "bench.also_presets=[auto]", "hydra.run.dir=out", "bench.record_dir=results", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    _assert_provenance(report, tmp_path, "tiny-steady")
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


def test_throughput_scenario_measures_images_per_second_per_batch_size(tmp_path):
    """Each method is measured at every batch size; one call makes ``batch`` images, so images/s is
    ``batch`` over the call's seconds, and quantized rows say how many layers they quantized."""
    proc = run_cli("bench", "model=tiny", "model.synthetic=false", "compile=none", "bench.scenarios=[throughput]",
                   "bench.throughput_modes=[int8]", "bench.throughput_batches=[1,2]", "bench.throughput_steps=2",
                   "bench.recipe_peer=false", "bench.repeat=1", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [(r["method"], r["batch"]) for r in rows] == [
        ("onediffx quantize=off compile=none", 1), ("onediffx quantize=off compile=none", 2),
        ("onediffx quantize=int8 compile=none", 1), ("onediffx quantize=int8 compile=none", 2)]
    for row in rows:
        assert row["steps"] == 2 and row["images_per_s"] == pytest.approx(row["batch"] / row["e2e_s"], rel=1e-2)
        assert "speedup_vs_recipe" not in row  # no recipe row asked for
    assert rows[2]["quantized_layers"] > 0 and "quantized_layers" not in rows[0]


@pytest.mark.parametrize("override, key", [("bench.throughput_modes=[fp9]", "bench.throughput_modes[0]"),
                                           ("bench.throughput_batches=[0]", "bench.throughput_batches[0]")])
def test_a_bad_throughput_option_is_one_line_before_any_model_loads(tmp_path, override, key):
    proc = run_cli("bench", "model=tiny", "model.synthetic=false", "bench.scenarios=[throughput]", override, cwd=tmp_path)
    assert proc.returncode == 2 and f"onediffx: error: {key}:" in proc.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("bench.json"))


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


def test_a_headline_record_needs_the_gpu_alone_and_the_readme_table_takes_only_such_records(tmp_path):
    """Asked for a headline where nobody can say the GPU was the bench's alone (a CPU), the bench still
    files its record, unmarked, and exits 1 with one line; the README generator refuses that record and
    fills its block from the same rows once the record is a headline one."""
    proc = run_cli("bench", "model=tiny", "model.synthetic=false", "compile=none", "bench.scenarios=[steady]",
                   "bench.peer_compile=false", "steps=2", "bench.repeat=1", "bench.unet_iters=1", "bench.headline=true",
                   "bench.record_name=tiny-headline", "bench.record_dir=results", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "onediffx: error: bench.headline: whether another process used the GPU could not be read")
    [record] = (tmp_path / "results").glob("*-cpu/tiny-headline.json")
    report = json.loads(record.read_text())
    _assert_provenance(report, tmp_path, "tiny-headline")

    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- bench-table:begin -->\nold\n<!-- bench-table:end -->\ntail\n")
    script = [sys.executable, str(REPO / "benchmarks" / "scripts" / "readme_table.py"), str(record), str(readme)]
    refused = subprocess.run(script, capture_output=True, text=True)
    assert refused.returncode == 1 and "is not a headline record" in refused.stderr and "old" in readme.read_text()

    record.write_text(json.dumps({**report, "headline": True}))  # as the bench marks a run with the GPU alone
    assert subprocess.run(script, capture_output=True, text=True).returncode == 0
    text = readme.read_text()
    assert text.startswith("# title\n<!-- bench-table:begin -->\n") and text.endswith("<!-- bench-table:end -->\ntail\n")
    eager = next(r for r in report["rows"] if r["method"] == "diffusers eager")
    assert f"| diffusers eager | {eager['e2e_s']:.3f} s |" in text and report["commit"][:10] in text
    assert "(again" not in text  # the second eager measurement is the baseline's check, not a row to quote


def test_gpu_watch_counts_the_benchs_own_child_processes_as_its_own():
    from onediffx.bench.record import _ancestors, card_slug

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        mine = _ancestors(child.pid)
    finally:
        child.kill()
    assert {child.pid, __import__("os").getpid()} <= mine
    assert [card_slug(n) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "cpu (x86_64, 2 threads)", "Tesla T4")] == \
        ["h100", "h200", "cpu", "t4"]


def test_the_bench_measures_a_transformer_pipeline_as_it_measures_a_unet(tmp_path):
    """FLUX (tiny, eager): the steady and quantize scenarios time and quantize the transformer, the
    denoiser the pipeline has, with the same rows as for a UNet."""
    proc = run_cli("bench", "model=tiny_flux", "model.synthetic=false", "compile=none",
                   "bench.scenarios=[steady,quantize]", "bench.peer_compile=false", "bench.recipe_peer=false",
                   "bench.quantize_modes=[int8]", "steps=2", "bench.repeat=1", "bench.unet_iters=1",
                   "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows if r["scenario"] == "quantize"] == \
        ["diffusers eager", "onediffx quantize=off compile=none", "onediffx quantize=int8 compile=none"]
    assert all(r["unet_step_ms"] > 0 for r in rows)
    int8 = rows[-1]
    assert int8["quantized_layers"] > 0 and int8["psnr_vs_unquantized_db"] > 30


def test_the_runs_quantize_options_reach_every_bench_row_that_can_take_them(tmp_path):
    """``quantize.convs=true quantize.attention=true`` apply to the static rows (calibrated scales) and
    name themselves in the method; the dynamic rows take the attention only."""
    proc = run_cli("bench", "model=tiny_xl", "model.synthetic=false", "compile=none", "bench.scenarios=[throughput]",
                   "bench.throughput_modes=[int8,int8_static]", "bench.throughput_batches=[1]", "bench.throughput_steps=2",
                   "quantize.convs=true", "quantize.attention=true", "bench.recipe_peer=false", "bench.repeat=1",
                   "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["onediffx quantize=off compile=none",
                                           "onediffx quantize=int8+attention compile=none",
                                           "onediffx quantize=int8_static+convs+attention compile=none"]
    assert rows[2]["quantized_layers"] > rows[1]["quantized_layers"]  # the 3x3 convolutions
