"""LoRA on a UNet whose attention projections are fused (``fuse_qkv_projections``, ``compile.fuse_qkv``).

Oracle: the same LoRA fused into the same weights without fused projections. Fusing, switching and
unfusing must reach ``to_qkv`` / ``to_kv``, which are what a fused attention computes with.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import onediffx.lora as lora
from onediffx.fused_qkv import fuse_qkv
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sdxl


def _image(pipe) -> np.ndarray:
    out = pipe(prompt="a red cube", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return out.images[0]


def _pipe(fused: str = ""):
    pipe = tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    if fused == "diffusers":  # separate projections beside the fused copy
        pipe.unet.fuse_qkv_projections()
    elif fused == "onediffx":  # separate projections over the fused copy's rows
        fuse_qkv(pipe.unet)
    return pipe


@pytest.mark.parametrize("fusing", ["diffusers", "onediffx"])
def test_lora_fused_after_fusing_projections_matches_the_unfused_model(fusing, tmp_path):
    targets = lora_targets(_pipe())
    files = [save_kohya(random_lora(targets, 4, seed=s), tmp_path / f"{s}.safetensors") for s in (1, 2)]
    plain, fused = _pipe(), _pipe(fusing)
    base = _image(fused)
    np.testing.assert_allclose(base, _image(plain), atol=1e-5, rtol=0)
    for pipe in (plain, fused):
        for i, path in enumerate(files):
            lora.load_and_fuse_lora(pipe, str(path), f"l{i}", lora_scale=0.8)
    one_plain, one_fused = _image(plain), _image(fused)
    assert np.abs(one_fused - base).max() > 1e-2  # the LoRA reached the fused projections
    np.testing.assert_allclose(one_fused, one_plain, atol=1e-5, rtol=0)
    for pipe in (plain, fused):
        lora.set_and_fuse_adapters(pipe, ["l1"], 0.5)  # a switch: one adapter out, a new weight
    np.testing.assert_allclose(_image(fused), _image(plain), atol=1e-5, rtol=0)
    lora.unfuse_lora(fused)
    np.testing.assert_array_equal(_image(fused), base)  # the fused projections are W0 again, bit for bit


def test_a_replaced_unet_is_freed_and_its_replacement_gets_the_lora(tmp_path):
    """Switches find fused attentions from a list cached per set of components. A UNet replaced
    after a LoRA load must not be kept alive by that list, and the new UNet's fused projections
    must take the next LoRA (the oracle: the same LoRA on a pipeline that never had another UNet)."""
    import gc
    import weakref

    path = save_kohya(random_lora(lora_targets(_pipe()), 4, seed=3), tmp_path / "3.safetensors")
    pipe, oracle = _pipe("diffusers"), _pipe("diffusers")
    lora.load_and_fuse_lora(pipe, str(path), "a", lora_scale=0.8)
    lora.delete_adapters(pipe)
    old = weakref.ref(next(m for m in pipe.unet.modules() if getattr(m, "fused_projections", False)))
    pipe.unet = _pipe("diffusers").unet
    gc.collect()
    assert old() is None, "the replaced UNet's attentions are still referenced"
    for p in (pipe, oracle):
        lora.load_and_fuse_lora(p, str(path), "a", lora_scale=0.8)
    fused = [m.to_qkv.weight for m in pipe.unet.modules() if getattr(m, "fused_projections", False) and hasattr(m, "to_qkv")]
    expected = [m.to_qkv.weight for m in oracle.unet.modules() if getattr(m, "fused_projections", False) and hasattr(m, "to_qkv")]
    assert fused and all(torch.equal(a, b) for a, b in zip(fused, expected, strict=True))
