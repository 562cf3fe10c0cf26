"""8-bit 3x3 convolutions (``quantize.convs``) on the CPU: the op's arithmetic against a hand-written
reference, its fake implementation under ``torch.compile(fullgraph=True)``, the tiny SDXL quantized
with them, a LoRA refused, and a restart from the graph cache that compiles nothing.

On the CPU the op computes in float32 (the reference path); cuDNN's kernels are checked against the
16-bit convolution by the GPU tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import job_dirs, run_cli
from onediffx.errors import ConfigError
from onediffx.models.tiny import build_tiny
from onediffx.quantize.calibrate import sqnr_db
from onediffx.quantize.config import CalibrateConfig
from onediffx.quantize.conv8 import FP8, Conv8, conv2d_8bit, quantize_input
from onediffx.quantize.pipe import quantize_pipe, quantize_state

pytest.importorskip("torchao")

CALIBRATE = CalibrateConfig(prompts=2, steps=2)
RESNET_CONV = "unet.down_blocks.1.resnets.0.conv1"


def _conv(seed: int = 0, cin: int = 32, cout: int = 64, stride: int = 1) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1), torch.randn(2, cin, 12, 12)


@pytest.mark.parametrize("stride", [1, 2])
def test_an_int8_conv_computes_the_hand_written_formula(stride):
    """``round(x / s_x)`` clamped to int8, weights per output channel ``round(w / (amax / 127))``, the
    integer convolution rescaled by ``s_x * s_w[k]``, plus the bias."""
    conv, x = _conv(stride=stride)
    s_x = float(x.abs().amax()) / 127
    layer = Conv8(conv, s_x, torch.int8)
    qx = (x / s_x).round().clamp(-127, 127)
    s_w = conv.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
    qw = (conv.weight.detach() / s_w.view(-1, 1, 1, 1)).round().clamp(-127, 127)
    expected = F.conv2d(qx, qw, None, stride, 1) * (s_x * s_w).view(1, -1, 1, 1) + conv.bias.detach().view(1, -1, 1, 1)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert sqnr_db(conv(x), out) > 30  # int8 of a Gaussian input: about 40 dB


@pytest.mark.parametrize("dtype", [FP8, torch.int8], ids=["fp8", "int8"])
def test_the_op_traces_with_its_fake_and_compiles_whole(dtype):
    """The fake implementation gives the real output's shape, dtype and layout (opcheck), so Dynamo
    traces the layer with ``fullgraph=True`` and Inductor's graph gives the eager op's output."""
    conv, x = _conv(seed=1)
    layer = Conv8(conv, float(x.abs().amax()) / (127 if dtype == torch.int8 else 448), dtype)
    q = quantize_input(x, layer.input_inv_scale, dtype)
    torch.library.opcheck(conv2d_8bit, (q, layer.weight, layer.descale, layer.bias, layer.stride, layer.padding,
                                        layer.dilation, torch.float32),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))  # no autograd: inference only
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    assert torch.equal(compiled, eager)


@pytest.fixture(scope="module")
def with_convs():
    """The tiny SDXL in static int8 with its 3x3 convolutions, and the same model unquantized."""
    pipe = build_tiny("tiny_xl")
    quantize_pipe(pipe, mode="int8", calibrate=CALIBRATE, convs=True)
    return pipe, build_tiny("tiny_xl")


def test_the_unets_spatial_convs_become_8bit_with_their_sqnr_reported(with_convs):
    pipe, plain = with_convs
    state = quantize_state(pipe)
    convs = [n for n, m in pipe.unet.named_modules() if isinstance(m, Conv8)]
    assert convs and all(f"unet.{n}" in state.layers for n in convs) and RESNET_CONV[len("unet."):] in convs
    assert isinstance(pipe.unet.conv_in, nn.Conv2d) and isinstance(pipe.unet.conv_out, nn.Conv2d)  # excluded by default
    assert state.skipped["unet.conv_in"].startswith("excluded")
    assert all(20 < state.sqnr_db[f"unet.{n}"] < 80 for n in convs)
    # the whole UNet: one real call's inputs (captured from the unquantized pipeline), both models' outputs
    from onediffx.bench.measure import UNetProbe

    probe = UNetProbe(plain.unet)
    plain("a red cube", num_inference_steps=1, height=64, width=64, output_type="latent")
    with torch.no_grad():
        reference = plain.unet(*probe.args, **probe.kwargs)[0]
        assert sqnr_db(reference, pipe.unet(*probe.args, **probe.kwargs)[0]) > 15


def test_a_lora_into_an_8bit_conv_is_refused_in_one_line(with_convs, tmp_path):
    from onediffx.lora import load_lora_and_optionally_fuse
    from onediffx.lora.errors import LoraError
    from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya

    pipe, plain = with_convs
    targets = {key: m for key, m in lora_targets(plain, components=("unet",)).items() if ".resnets." in key[1]}
    assert targets, "the LoRA must touch a ResNet convolution"
    source = save_kohya(random_lora(targets, 2, seed=3, strength=0.5), tmp_path / "convs.safetensors")
    weight = pipe.unet.get_submodule(RESNET_CONV[len("unet."):]).weight.clone()
    with pytest.raises(LoraError, match="has a calibrated activation scale"):
        load_lora_and_optionally_fuse(pipe, str(source), "convs", fuse=True)
    assert torch.equal(pipe.unet.get_submodule(RESNET_CONV[len("unet."):]).weight, weight)


def test_convs_without_calibration_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="quantize.convs: 8-bit convolutions take a calibrated input scale"):
        quantize_pipe(build_tiny("tiny_xl"), mode="int8", convs=True)
    proc = run_cli("run", "model=tiny_xl", "quantize=int8", "quantize.convs=true", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("onediffx: error: quantize.convs:")


@pytest.mark.slow
def test_a_restart_loads_the_8bit_graphs_and_compiles_nothing(tmp_path):
    """Both 8-bit ops (convolution and attention) inside Inductor's graph go through the graph cache:
    the second process (the real CLI) loads the calibration and the graphs, compiles nothing, and
    makes the same image."""
    args = ("run", "model=tiny_xl", "quantize=int8_static", "quantize.convs=true", "quantize.attention=true",
            "quantize.quality=false",
            "compile=inductor", "compile.components=[unet]", f"cache.dir={tmp_path / 'cache'}", "steps=2")
    images = []
    for run in ("cold", "warm"):
        proc = run_cli(*args, f"hydra.run.dir={run}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        images.append(np.asarray(__import__("PIL.Image").Image.open(next((tmp_path / run).glob("*.png")))))
    assert metrics["stages"]["load-graph"]["hit"] is True
    assert metrics["compile_counters"]["graphs_compiled"] == 0 and metrics["compile_counters"]["dynamo_graphs"] == 0
    assert any(name.endswith("resnets.0.conv1") for name in metrics["stages"]["quantize"]["quantized_layers"])
    assert metrics["stages"]["quantize"]["attention8"] > 0
    assert np.array_equal(images[0], images[1])


def _capability_for(dtype: torch.dtype) -> bool:
    return torch.cuda.is_available() and (dtype == torch.int8 or torch.cuda.get_device_capability() >= (8, 9))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, floor_db", [(FP8, 25.0), (torch.int8, 35.0)], ids=["fp8", "int8"])
@pytest.mark.parametrize("stride", [1, 2])
def test_cudnns_8bit_conv_matches_the_16bit_conv_and_replays_in_a_cuda_graph(dtype, floor_db, stride):
    """cuDNN's kernel against bf16 ``F.conv2d`` at an SDXL width (SQNR above the floor: fp8 keeps 3
    mantissa bits, int8 about 7), against the float32 reference of the same op (the arithmetic is
    the same, only the summation order differs), and replayed from a CUDA graph with new input."""
    if not _capability_for(dtype):
        pytest.skip("needs CUDA (fp8: compute capability 8.9 or newer)")
    from onediffx.quantize.conv8 import reference

    torch.manual_seed(0)
    conv = nn.Conv2d(320, 640, 3, stride=stride, padding=1).cuda().to(torch.bfloat16)
    x = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    layer = Conv8(conv, float(x.abs().amax()) / (448.0 if dtype == FP8 else 127.0), dtype)
    with torch.no_grad():
        out = layer(x)
        assert sqnr_db(conv(x), out) > floor_db
        q = quantize_input(x, layer.input_inv_scale, dtype)
        expected = reference(q, layer.weight, layer.descale, layer.bias, layer.stride, layer.padding, layer.dilation,
                             torch.float32)
        assert sqnr_db(expected, out) > 45  # bf16 output rounding, not a different computation
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x)  # builds the cuDNN plan outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(static_x)
        other = torch.randn_like(x)
        static_x.copy_(other)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, layer(other))


@pytest.mark.gpu
def test_the_8bit_unet_compiles_whole_on_cuda_and_matches_its_eager_self():
    """The tiny SDXL with 8-bit convolutions, compiled ``fullgraph=True`` by Inductor on CUDA: the op
    runs inside the compiled graph and gives the eager quantized UNet's output."""
    if not _capability_for(FP8):
        pytest.skip("needs CUDA with fp8 (compute capability 8.9 or newer)")
    from onediffx.bench.measure import UNetProbe

    pipe = build_tiny("tiny_xl").to("cuda", torch.bfloat16)
    quantize_pipe(pipe, mode="fp8", calibrate=CALIBRATE, convs=True)
    probe = UNetProbe(pipe.unet)
    pipe("a red cube", num_inference_steps=1, height=64, width=64, output_type="latent")
    with torch.no_grad():
        eager = pipe.unet(*probe.args, **probe.kwargs)[0]
        compiled = torch.compile(pipe.unet, fullgraph=True)(*probe.args, **probe.kwargs)[0]
    assert sqnr_db(eager, compiled) > 30  # Inductor fuses the casts: bf16 rounding may differ
