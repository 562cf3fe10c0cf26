"""fp8 self-attention (``quantize.attention``) on the CPU: the op's arithmetic against PyTorch's
attention, its fake implementation under ``torch.compile(fullgraph=True)``, the tiny SDXL with its
self-attentions in fp8 (cross-attentions untouched) and in the graph cache's key. cuDNN's kernel is
checked against the reference by the GPU test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onediffx.models.tiny import build_tiny
from onediffx.quantize.attention8 import Attention8, quantize_per_tensor, reference, sdpa_8bit
from onediffx.quantize.calibrate import sqnr_db
from onediffx.quantize.pipe import quantize_pipe, quantize_state

pytest.importorskip("torchao")


def _qkv(seed: int = 0, tokens: int = 256, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator(device).manual_seed(seed)
    return [torch.randn(2, 4, tokens, 64, generator=g, device=device, dtype=dtype) for _ in range(3)]


def test_fp8_attention_is_pytorchs_attention_within_fp8_precision():
    q, k, v = _qkv()
    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
    out = sdpa_8bit(q8, k8, v8, sq, sk, sv, 64 ** -0.5, torch.float32)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert sqnr_db(F.scaled_dot_product_attention(q, k, v), out) > 20  # e4m3 operands and probabilities


def test_the_op_traces_with_its_fake_and_compiles_whole():
    q, k, v = _qkv(seed=1, tokens=64)
    args = [*(t for pair in (quantize_per_tensor(x) for x in (q, k, v)) for t in pair)]
    q8, sq, k8, sk, v8, sv = args
    torch.library.opcheck(sdpa_8bit, (q8, k8, v8, sq, sk, sv, 0.125, torch.float32),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))

    def attend(q, k, v):
        (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
        return torch.ops.onediffx.sdpa_8bit(q8, k8, v8, sq, sk, sv, 0.125, q.dtype)

    assert torch.equal(torch.compile(attend, fullgraph=True)(q, k, v), attend(q, k, v))


@pytest.fixture(scope="module")
def pipes():
    quantized = build_tiny("tiny_xl")
    quantize_pipe(quantized, mode="int8", attention=True)
    return quantized, build_tiny("tiny_xl")


def test_self_attentions_take_fp8_and_cross_attentions_keep_theirs(pipes):
    quantized, plain = pipes
    processors = quantized.unet.attn_processors
    self_attn = [n for n in processors if ".attn1." in n]
    assert self_attn and all(isinstance(processors[n], Attention8) for n in self_attn)
    assert not any(isinstance(p, Attention8) for n, p in processors.items() if ".attn2." in n)
    state = quantize_state(quantized)
    assert len(state.attention8) == len(self_attn) and state.facts()["attention8"] == len(self_attn)
    plain_key = build_tiny("tiny_xl")
    quantize_pipe(plain_key, mode="int8")
    assert state.cache_key("unet")["attention8"] == len(self_attn) and "attention8" not in quantize_state(plain_key).cache_key("unet")
    from onediffx.bench.measure import UNetProbe

    probe = UNetProbe(plain.unet)
    plain("a red cube", num_inference_steps=1, height=64, width=64, output_type="latent")
    with torch.no_grad():
        assert sqnr_db(plain.unet(*probe.args, **probe.kwargs)[0], quantized.unet(*probe.args, **probe.kwargs)[0]) > 15


@pytest.mark.gpu
def test_cudnns_fp8_attention_matches_its_reference_and_replays_in_a_cuda_graph():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a Hopper GPU")
    q, k, v = _qkv(tokens=4096, device="cuda", dtype=torch.bfloat16)
    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
    out = sdpa_8bit(q8, k8, v8, sq, sk, sv, 64 ** -0.5, torch.bfloat16)
    assert sqnr_db(F.scaled_dot_product_attention(q, k, v), out) > 20
    assert sqnr_db(reference(q8, k8, v8, sq, sk, sv, 64 ** -0.5, torch.float32), out) > 35
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sdpa_8bit(q8, k8, v8, sq, sk, sv, 64 ** -0.5, torch.bfloat16)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)
