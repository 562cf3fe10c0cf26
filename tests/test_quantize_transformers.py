"""torchao int8 on the tiny FLUX transformer (CPU), with per-layer selection.

Oracle: the unquantized pipeline with the same seed (PSNR). ``quantize=int8`` names the denoiser,
so the same preset quantizes a UNet or a transformer; the embeddings and the transformer's first
and last projections stay in high precision by default, as a UNet's ``conv_in``/``conv_out`` do.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onediffx.models.tiny import tiny_flux
from onediffx.quantize import quantize_pipe, quantize_state
from onediffx.quantize.quality import image_fidelity
from onediffx.quantized_weights import is_quantized

pytest.importorskip("torchao")

MIN_PSNR_DB = 35.0
"""As for the tiny UNets (``test_quantize.py``): random weights, so this says nothing broke, not how FLUX fares."""


def _image(pipe) -> np.ndarray:
    out = pipe("a red fox", num_inference_steps=2, height=64, width=64, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def reference():
    pipe = tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    return _image(pipe)


def test_int8_quantizes_the_flux_transformer_and_keeps_its_image(reference):
    pipe = tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    quantize_pipe(pipe, mode="int8")
    state = quantize_state(pipe)
    chosen = set(state.layers)
    assert chosen and all(name.startswith("transformer.") for name in chosen)
    params = dict(pipe.transformer.named_modules())
    assert all(is_quantized(params[name[len("transformer."):]].weight) for name in chosen)
    for name in ("transformer.x_embedder", "transformer.context_embedder", "transformer.proj_out",
                 "transformer.time_text_embed.timestep_embedder.linear_1", "transformer.norm_out.linear"):
        assert name not in chosen and state.skipped[name].startswith("excluded")
    assert "transformer.single_transformer_blocks.0.proj_mlp" in chosen
    assert "transformer.transformer_blocks.0.attn.add_q_proj" in chosen  # unfused: joint attention stays unfused
    psnr, _ = image_fidelity(reference, _image(pipe))
    assert psnr >= MIN_PSNR_DB


def test_per_layer_selection_leaves_excluded_blocks_in_high_precision(reference):
    pipe = tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    quantize_pipe(pipe, mode="int8", exclude=["transformer.single_transformer_blocks.*", "*.ff_context.*"])
    state = quantize_state(pipe)
    assert state.layers and not any(".single_transformer_blocks." in name or ".ff_context." in name
                                    for name in state.layers)
    assert state.skipped["transformer.single_transformer_blocks.1.proj_mlp"].startswith("excluded")
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.1.ff.net.2"} <= set(state.layers)
    psnr, _ = image_fidelity(reference, _image(pipe))
    assert psnr >= MIN_PSNR_DB
