"""Calibrated static scales (``quantize.calibrate``) on the CPU, tiny SDXL: int8, which CPUs run.

The oracle for the arithmetic is written out by hand: a static per-tensor int8 layer computes
``round(x / s_x)`` clamped to int8, times the weight quantized with torchao's symmetric per-tensor
rule (``amax / 127.5``), rescaled. Calibration itself must be repeatable (same weights, same
ranges, bit for bit), filed under a key of the weights, and reused by a restart without a single
UNet call.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import run_cli
from onediffx.errors import ConfigError
from onediffx.models.tiny import build_tiny
from onediffx.quantize import calibrate as cal
from onediffx.quantize.config import CalibrateConfig
from onediffx.quantize.pipe import quantize_pipe, quantize_state

pytest.importorskip("torchao")

FF = "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
CALIBRATE = CalibrateConfig(prompts=2, steps=2)


def _unet_calls(pipe) -> list[int]:
    calls = [0]
    pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny SDXL quantized to static int8, its ranges' folder, and its FF layer's weight before."""
    folder = tmp_path_factory.mktemp("calibration")
    pipe = build_tiny("tiny_xl")
    ff = pipe.unet.get_submodule(FF[len("unet."):])
    before = (ff.weight.detach().clone(), ff.bias.detach().clone())
    quantize_pipe(pipe, mode="int8", calibrate=CALIBRATE, calibration=folder)
    return pipe, folder, before


def test_a_static_int8_layer_computes_what_the_hand_written_reference_does(calibrated):
    pipe, _, (weight, bias) = calibrated
    record = next(r for r in quantize_state(pipe).records if r.name == FF)
    s_x = float(record.config.act_quant_scale.reshape(()))
    x = (torch.rand(2, 16, weight.shape[1], generator=torch.Generator().manual_seed(0)) * 2 - 1) * s_x * 127
    q_x = torch.clamp(torch.round(x / s_x), -128, 127)
    s_w = weight.abs().amax() / 127.5
    q_w = torch.clamp(torch.round(weight / s_w), -128, 127)
    reference = (q_x @ q_w.t()) * s_x * s_w + bias
    out = pipe.unet.get_submodule(FF[len("unet."):])(x)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-6)  # bound: float32 rounding of the same sums
    exact = nn.functional.linear(x, weight, bias)
    assert float((out - exact).detach().norm() / exact.detach().norm()) < 0.02  # and 8 bits are close to the float layer


def test_calibration_is_repeatable_saved_and_reused_by_a_restart_without_calls(calibrated):
    pipe, folder, _ = calibrated
    state = quantize_state(pipe)
    [saved] = folder.glob("calibration-*.safetensors")
    assert saved.name == f"calibration-{state.calibration}.safetensors"
    assert state.facts()["calibration"] == state.calibration and len(state.layers) > 50
    first = cal.load(folder, state.calibration)
    assert set(first.amax) == set(state.layers) and all(v > 0 for v in first.amax.values())

    again = build_tiny("tiny_xl")  # a restart: same weights, same options
    calls = _unet_calls(again)
    quantize_pipe(again, mode="int8", calibrate=CALIBRATE, calibration=folder)
    assert calls[0] == 0 and quantize_state(again).calibration == state.calibration  # loaded, not measured
    scales = {r.name: float(r.config.act_quant_scale.reshape(())) for r in quantize_state(again).records}
    assert scales == {n: torch.tensor(first.scale(n, 127.0), dtype=torch.float32).item() for n in state.layers}

    fresh = build_tiny("tiny_xl")
    calls = _unet_calls(fresh)
    quantize_pipe(fresh, mode="int8", calibrate=CALIBRATE)  # no folder: measured again, kept nowhere
    assert calls[0] == CALIBRATE.prompts * CALIBRATE.steps  # one UNet call a step (the CFG pair is one batch)
    remeasured = {r.name: float(r.config.act_quant_scale.reshape(())) for r in quantize_state(fresh).records}
    assert remeasured == scales  # same weights, prompts and seeds: the same ranges, bit for bit


def test_other_weights_get_another_key():
    pipe = build_tiny("tiny_xl")
    layers = {"ff": pipe.unet.get_submodule(FF[len("unet."):])}
    key = cal.calibration_key(layers, "int8", 2, 2, 64, 64)
    assert cal.calibration_key(layers, "int8", 2, 3, 64, 64) != key  # the settings are in the key
    with torch.no_grad():
        layers["ff"].weight.add_(1e-3)  # what a fused LoRA does to a layer
    assert cal.calibration_key(layers, "int8", 2, 2, 64, 64) != key


def test_a_foreign_or_corrupt_calibration_file_is_measured_again(tmp_path):
    ranges = cal.Ranges({"ff": 3.0}, {"ff": 3}, "k1")
    cal.save(ranges, tmp_path)
    assert cal.load(tmp_path, "k1") == ranges and cal.load(tmp_path, "k2") is None
    cal.path_for(tmp_path, "k1").write_bytes(b"not safetensors")
    assert cal.load(tmp_path, "k1") is None


def test_calibrating_a_weight_only_mode_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="quantize.calibrate: int8_weight_only quantizes no activations"):
        quantize_pipe(build_tiny("tiny_xl"), mode="int8_weight_only", calibrate=CALIBRATE)
    proc = run_cli("run", "model=tiny_xl", "quantize=int8_static", "quantize.mode=fp8_weight_only", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("onediffx: error: quantize.calibrate: fp8_weight_only")


def test_fusing_a_lora_into_calibrated_layers_is_refused_before_any_weight_changes(calibrated, tmp_path):
    """The stated policy: refuse. A LoRA moves activations past the calibrated range, which would clip."""
    from onediffx.lora import load_lora_and_optionally_fuse
    from onediffx.lora.errors import LoraError
    from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
    from onediffx.quantized_weights import inner_tensors

    pipe, _, _ = calibrated
    twin = build_tiny("tiny_xl")  # a LoRA is made for the model's high-precision weights
    source = save_kohya(random_lora(lora_targets(twin, components=("unet",)), 2, seed=3, strength=0.5),
                        tmp_path / "style.safetensors")
    before = {n: [t.clone() for t in (inner_tensors(p) or [p])] for n, p in pipe.unet.named_parameters()}
    with pytest.raises(LoraError, match=r"has a calibrated activation scale.*\(quantize=fp8 or int8"):
        load_lora_and_optionally_fuse(pipe, str(source), "style", fuse=True)
    after = dict(pipe.unet.named_parameters())
    assert all(torch.equal(a, b) for n, ts in before.items() for a, b in zip(ts, inner_tensors(after[n]) or [after[n]]))


def test_each_quantized_layer_reports_its_sqnr_saved_with_the_ranges(calibrated):
    pipe, folder, _ = calibrated
    state = quantize_state(pipe)
    facts = state.facts()
    assert set(state.sqnr_db) == set(state.layers)
    values = list(facts["layer_sqnr_db"].values())
    assert values == sorted(values) and facts["sqnr_db_min"] == values[0]  # worst layers first
    assert 20 < facts["sqnr_db_min"] < facts["sqnr_db_median"] < 80  # int8: tens of dB, not exact, not broken
    assert cal.load(folder, state.calibration).sqnr_db == pytest.approx(state.sqnr_db, abs=1e-4)  # float32 in the file


def test_sqnr_is_the_power_ratio_in_decibels():
    reference = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    assert cal.sqnr_db(reference, reference * 1.01) == pytest.approx(40.0, abs=1e-3)  # noise = 1% of the signal
    assert cal.sqnr_db(reference, reference) == float("inf")


def test_min_sqnr_leaves_the_noisiest_layers_in_high_precision_on_every_start(calibrated):
    """``calibrate.min_sqnr_db``: layers under the floor stay unquantized, the same set on a fresh
    calibration and on a restart that loads the saved ranges (graph-cache keys must agree)."""
    pipe, folder, _ = calibrated
    sqnr = quantize_state(pipe).sqnr_db
    floor = sorted(sqnr.values())[3] + 1e-3  # the four noisiest layers fall under it
    options = CalibrateConfig(prompts=CALIBRATE.prompts, steps=CALIBRATE.steps, min_sqnr_db=floor)
    restarted = build_tiny("tiny_xl")
    quantize_pipe(restarted, mode="int8", calibrate=options, calibration=folder)
    fresh = build_tiny("tiny_xl")
    quantize_pipe(fresh, mode="int8", calibrate=options)
    noisy = {n for n, v in sqnr.items() if v < floor}
    for state in (quantize_state(restarted), quantize_state(fresh)):
        assert len(noisy) == 4 and noisy.isdisjoint(state.layers) and set(state.layers) == set(sqnr) - noisy
        assert all(state.skipped[n].startswith("SQNR ") for n in noisy)
    assert quantize_state(fresh).cache_key("unet") == quantize_state(restarted).cache_key("unet")


def test_min_speedup_times_each_layer_once_per_card_and_keeps_16_bits_where_8_are_not_faster(tmp_path):
    """``calibrate.min_speedup``: each chosen layer is timed in both forms at its calibration input
    shape and saved with the ranges for this card; a restart reuses the figures (no new timing: the
    same values to the bit) and leaves exactly the layers under the floor in high precision."""
    first = build_tiny("tiny_xl")
    quantize_pipe(first, mode="int8", calibrate=CalibrateConfig(prompts=2, steps=2, min_speedup=1e-6),
                  calibration=tmp_path)
    timed = quantize_state(first).speedup
    assert timed and set(timed) == set(quantize_state(first).layers)  # 1e-6 keeps every layer
    saved = cal.load(tmp_path, quantize_state(first).calibration)
    assert saved.speedup_device and saved.shapes[FF][-1] == first.unet.get_submodule(FF[len("unet."):]).in_features and saved.speedup == pytest.approx(timed, rel=1e-6)
    saved_speedup = dict(saved.speedup)  # float32 in the file: the restart compares these values
    floor = sorted(saved_speedup.values())[len(saved_speedup) // 2]
    restarted = build_tiny("tiny_xl")
    quantize_pipe(restarted, mode="int8", calibrate=CalibrateConfig(prompts=2, steps=2, min_speedup=floor),
                  calibration=tmp_path)
    state = quantize_state(restarted)
    assert state.speedup == pytest.approx(timed, rel=1e-6)  # loaded, not timed again
    slow = {n for n, v in saved_speedup.items() if v < floor}
    assert slow and set(state.layers) == set(saved_speedup) - slow
    assert all("below calibrate.min_speedup" in state.skipped[n] for n in slow)
    facts = state.facts()
    assert facts["speedup_min"] == pytest.approx(min(timed.values()), abs=1e-3) and len(facts["layer_speedup"]) == len(timed)
