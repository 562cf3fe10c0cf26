"""The fast paths of the LoRA engine: one-pass safetensors reading and one-matmul fusing.

Reading must give exactly what safetensors' own ``load_file`` gives, with scalars (alphas) kept on
the CPU. Fusing in the weight's dtype must agree with the float32 reference ``round(W0 + sum
coef_i * up_i @ down_i)`` (the only differences allowed: the last bit of a rare value whose float32
sum lands on a rounding boundary in another summation order), take the path the module docstring
says, and unfuse bit-exactly. Each test runs on the CPU and, where there is one, on CUDA.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import onediffx.lora as lora
from onediffx.lora import LoraFormatError, fuse, sources
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sdxl

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _mixed(tmp_path):
    state_dict = {
        "a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int8), "c": torch.randn(2, 3).half(),
        "alpha": torch.tensor(2.5), "e": torch.randn(1, 3, 1, 1).bfloat16(), "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]), "d": torch.randn(300, 7).double(),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(state_dict, str(path), metadata={"format": "pt"})
    return path


def _handwritten(tmp_path, entries, data: bytes, name="hand.safetensors"):
    """A safetensors file written byte by byte, for layouts the library never writes."""
    header = json.dumps(entries).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("device", DEVICES)
def test_reading_gives_what_safetensors_gives(device, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK", 64)  # many staging chunks on CUDA, scalars in several of them
    path = _mixed(tmp_path)
    expected = load_file(str(path))
    got, metadata = sources._read_safetensors(path, torch.device(device))
    assert metadata == {"format": "pt"} and sorted(got) == sorted(expected)  # safetensors < 0.6 lists keys by name
    for key, tensor in expected.items():
        want_device = "cpu" if tensor.numel() == 1 else device  # .item() of an alpha must not wait for a GPU
        assert got[key].device.type == want_device and got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key].cpu(), tensor), key


@pytest.mark.parametrize("device", DEVICES)
def test_reading_copes_with_misaligned_tensors(device, tmp_path, monkeypatch):
    """Offsets the library never writes (an F32 at byte 1) are copied out rather than viewed."""
    monkeypatch.setattr(sources, "CHUNK", 8)  # the scalar at bytes 17..21 straddles two chunks
    values = torch.arange(4, dtype=torch.float32)
    entries = {"u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
               "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [1, 17]},
               "s": {"dtype": "F32", "shape": [], "data_offsets": [17, 21]}}
    data = b"\x07" + values.numpy().tobytes() + torch.tensor(3.5).numpy().tobytes()
    got, _ = sources._read_safetensors(_handwritten(tmp_path, entries, data), torch.device(device))
    assert torch.equal(got["w"].cpu(), values.view(2, 2)) and got["w"].device.type == device
    assert got["u"].item() == 7 and got["s"].item() == 3.5


BAD_HEADERS = {
    "negative shape": ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "bool shape": ({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
    "size mismatch": ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8),
    "beyond the data": ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
    "unknown dtype": ({"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"),
    "no offsets": ({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "metadata not strings": ({"__metadata__": {"a": 1}, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
                             b"\0"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_headers_are_refused(case, tmp_path):
    path = _handwritten(tmp_path, *BAD_HEADERS[case])
    with pytest.raises(LoraFormatError, match="not a readable safetensors file"):
        sources._read_safetensors(path, torch.device("cpu"))


# --- fusing ---------------------------------------------------------------------------------------


def _weights(pipe):
    return {(c, n): p.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            for n, p in getattr(pipe, c).named_parameters()}


def _reference(originals, layers_by_weight, device):
    """float32 ``round(W0 + sum coef * up @ down)`` from the factors as the file holds them (fp16)."""
    expected = dict(originals)
    for key, terms in layers_by_weight.items():
        w0 = originals[key]
        acc = w0.to(device, torch.float32).reshape(w0.shape[0], -1)
        for layer, coef in terms:
            up = layer.up.half().float().reshape(w0.shape[0], -1).to(device)
            down = layer.down.half().float().reshape(up.shape[1], -1).to(device)
            acc = acc + coef * (up @ down)
        expected[key] = acc.view(w0.shape).to(w0.dtype)
    return expected


def _assert_rounded_once(got, expected, context):
    """Equal, but for last-bit differences on a tiny share of values (float32 summation order)."""
    differing = total = 0
    for key, want in expected.items():
        have = got[key].to(want.device)
        diff = have != want
        if diff.any():
            assert torch.equal(torch.nextafter(want[diff], have[diff]), have[diff]), f"{context}: {key} off by > 1 ulp"
        differing += int(diff.sum())
        total += want.numel()
    assert differing <= 1e-3 * total, f"{context}: {differing} of {total} values differ"


class _PathSpy:
    """Counts which writer ``fuse`` used, and how many matmuls the one-dtype path did per weight."""

    def __init__(self, monkeypatch):
        self.native, self.float32, self.matmuls = 0, 0, set()
        write_native, write_float32 = fuse._write_native, fuse._write_float32

        def native(param, w0, products):
            self.native += 1
            self.matmuls.add(len(products))
            return write_native(param, w0, products)

        def float32(*args):
            self.float32 += 1
            return write_float32(*args)

        monkeypatch.setattr(fuse, "_write_native", native)
        monkeypatch.setattr(fuse, "_write_float32", float32)

    def took(self, native: bool, matmuls: int = 1) -> bool:
        result = (self.native > 0 and self.float32 == 0 and self.matmuls == {matmuls}) if native else (
            self.float32 > 0 and self.native == 0)
        self.native, self.float32, self.matmuls = 0, 0, set()
        return result


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offload", ["cuda", "cpu"])
def test_fp16_weights_fuse_in_one_matmul_and_round_once(device, offload, tmp_path, monkeypatch):
    pipe = tiny_sdxl().to(device, torch.float16)
    originals = _weights(pipe)
    targets = lora_targets(pipe)
    layers = {name: random_lora(targets, rank, seed=60 + rank, alpha=lambda key, r: r / 2)
              for name, rank in (("a", 4), ("b", 2), ("c", 3))}
    for name, lay in layers.items():
        save_kohya(lay, tmp_path / f"{name}.safetensors", dtype=torch.float16,
                   sgm_layers_per_block=pipe.unet.config.layers_per_block)
    spy = _PathSpy(monkeypatch)

    def expect(weights):
        by_weight = {}
        for name, weight in weights.items():  # load order, as fuse sums them
            for (component, path), layer in layers[name].items():
                by_weight.setdefault((component, f"{path}.weight"), []).append((layer, weight * layer.scale))
        return _reference(originals, by_weight, device)

    # one adapter into weights that hold W0: a single addmm_ straight into each weight
    lora.load_and_fuse_lora(pipe, str(tmp_path / "a.safetensors"), "a", lora_scale=0.7, offload_device=offload,
                            offload_weight="weight")
    assert spy.took(native=True)
    _assert_rounded_once(_weights(pipe), expect({"a": 0.7}), "a")
    for name in ("b", "c"):
        lora.load_lora_and_optionally_fuse(pipe, str(tmp_path / f"{name}.safetensors"), name, fuse=False,
                                           offload_device=offload, offload_weight="weight")
    # same w * alpha/rank for all three: one matmul over the concatenated factors, from the W0 copy
    lora.set_and_fuse_adapters(pipe, ["c", "a", "b"], 0.9)
    assert spy.took(native=True, matmuls=1)
    equal = _weights(pipe)
    _assert_rounded_once(equal, expect({"a": 0.9, "b": 0.9, "c": 0.9}), "a+b+c")
    # different coefficients: the float32 accumulator
    lora.set_and_fuse_adapters(pipe, ["a", "c"], [0.5, -1.2])
    assert spy.took(native=False)
    _assert_rounded_once(_weights(pipe), expect({"a": 0.5, "c": -1.2}), "a-c")
    # back to the equal set: the same bits as before
    lora.set_and_fuse_adapters(pipe, ["a", "b", "c"], 0.9)
    assert all(torch.equal(v, equal[k]) for k, v in _weights(pipe).items())
    lora.unfuse_lora(pipe)
    assert all(torch.equal(v, originals[k]) for k, v in _weights(pipe).items())


@pytest.mark.parametrize("device", DEVICES)
def test_offload_device_does_not_change_the_bits(device, tmp_path):
    """W0 on the weights' device (multi-tensor backups) or pinned on the CPU: the same fused weights."""
    pipes = {offload: tiny_sdxl().to(device, torch.float16) for offload in ("cuda", "cpu")}
    targets = lora_targets(pipes["cpu"])
    for i in range(2):
        save_kohya(random_lora(targets, 3, seed=70 + i), tmp_path / f"{i}.safetensors", dtype=torch.float16)
    for offload, pipe in pipes.items():
        for i in range(2):
            lora.load_and_fuse_lora(pipe, str(tmp_path / f"{i}.safetensors"), str(i), lora_scale=0.8,
                                    offload_device=offload)
        lora.set_and_fuse_adapters(pipe, ["0", "1"], [0.3, 0.6])
    a, b = _weights(pipes["cuda"]), _weights(pipes["cpu"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_written_elsewhere_between_fuses_become_the_new_w0(tmp_path):
    """The version check still holds with bulk backups: a foreign write is the new W0, not undone."""
    pipe = tiny_sdxl()
    path = save_kohya(random_lora(lora_targets(pipe), 4, seed=80), tmp_path / "l.safetensors")
    lora.load_and_fuse_lora(pipe, str(path), "l", offload_device="cuda")
    lora.unfuse_lora(pipe)
    layer = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        layer.weight.add_(1.0)  # someone else's write while nothing is fused
    new_w0 = layer.weight.detach().clone()
    lora.set_and_fuse_adapters(pipe, "l", 1.0)
    assert not torch.equal(layer.weight, new_w0)
    lora.unfuse_lora(pipe)
    assert torch.equal(layer.weight, new_w0)
