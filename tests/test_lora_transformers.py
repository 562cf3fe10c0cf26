"""LoRA on FLUX.1 and SD3.5 (tiny_flux, tiny_sd3) in the formats people publish, against diffusers.

The oracle is diffusers' ``load_lora_weights`` + ``fuse_lora`` over every LoRA-loadable component
(FLUX's ``fuse_lora`` fuses only the transformer unless told; onediffx fuses the text encoder too).
Each file is written by ``onediffx.lora.synthetic`` as a real safetensors file with seeded factors;
the fused weights and the image must match diffusers', and unfusing and switching must be bit-exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import onediffx.lora as lora
from onediffx.errors import OnediffxError
from onediffx.fused_qkv import fuse_qkv
from onediffx.lora import LoraFormatError, LoraMismatchError
from onediffx.lora.synthetic import (
    diffusers_state_dict, kohya_flux_state_dict, lora_targets, random_lora, save_kohya, save_state_dict,
    xlabs_state_dict,
)
from onediffx.models.tiny import tiny_flux, tiny_sd3, tiny_sdxl

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_FUSED_IN_SINGLE_BLOCKS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def weights(pipe) -> dict:
    return {(c, n): p.detach().clone() for c in COMPONENTS if getattr(pipe, c, None) is not None
            for n, p in getattr(pipe, c).named_parameters()}


def _kohya_targets(pipe) -> dict:
    """Block layers and CLIP; not single blocks' fused ``linear1``, which diffusers' converter splits
    at FLUX.1's full sizes only (3072/12288 rows)."""
    return {k: m for k, m in lora_targets(pipe, conv=False).items()
            if not (k[1].startswith("single_transformer_blocks.") and k[1].endswith(_FUSED_IN_SINGLE_BLOCKS))}


def _attention_targets(pipe, double_only: bool = False) -> dict:
    return {k: m for k, m in lora_targets(pipe, components=("transformer",)).items()
            if ".attn." in k[1] and not (double_only and k[1].startswith("single"))}


def flux_diffusers(pipe):
    """ai-toolkit / diffusers' scripts: ``transformer.*.lora_A``, CLIP too, alphas stored per layer."""
    return diffusers_state_dict(random_lora(lora_targets(pipe, conv=False), 4, seed=1, alpha=lambda k, r: 8.0))


def flux_kohya_bfl(pipe):
    """sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv`` (q/k/v as one layer), ``lora_te1_``."""
    return kohya_flux_state_dict(random_lora(_kohya_targets(pipe), 4, seed=2, alpha=lambda k, r: 2.0))


def flux_kohya_diffusers_names(pipe):
    """``lora_transformer_transformer_blocks_0_attn_to_q`` with alphas (diffusers maps attention layers)."""
    layers = random_lora({**_attention_targets(pipe), **lora_targets(pipe, components=("text_encoder",))}, 4,
                         seed=3, alpha=lambda k, r: 16.0)
    return kohya_flux_state_dict(layers, names="diffusers")


def flux_xlabs(pipe):
    """XLabs: ``double_blocks.0.processor.qkv_lora1.down.weight``, no alpha."""
    return xlabs_state_dict(random_lora(_attention_targets(pipe, double_only=True), 4, seed=4))


def sd3_diffusers(pipe):
    """SD3.5 in diffusers format: joint and dual-attention blocks and both CLIP encoders."""
    return diffusers_state_dict(random_lora(lora_targets(pipe, conv=False), 4, seed=5))


FORMATS = {
    "flux_diffusers": (tiny_flux, flux_diffusers),
    "flux_kohya_bfl": (tiny_flux, flux_kohya_bfl),
    "flux_kohya_diffusers_names": (tiny_flux, flux_kohya_diffusers_names),
    "flux_xlabs": (tiny_flux, flux_xlabs),
    "sd3_diffusers": (tiny_sd3, sd3_diffusers),
}


def diffusers_fuse(pipe, path, scale: float) -> None:
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=pipe._lora_loadable_modules, lora_scale=scale)
    pipe.unload_lora_weights()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fused_weights_and_image_match_diffusers(fmt, tmp_path):
    build, write = FORMATS[fmt]
    ours, theirs = build(), build()
    path = save_state_dict(write(ours), tmp_path / f"{fmt}.safetensors")
    base_image, originals = image(ours), weights(ours)
    ptrs = {n: p.data_ptr() for n, p in ours.transformer.named_parameters()}

    diffusers_fuse(theirs, path, 0.7)
    lora.load_and_fuse_lora(ours, str(path), lora_scale=0.7)

    expected, got = weights(theirs), weights(ours)
    changed = {k for k in got if not torch.equal(got[k], originals[k])}
    assert len(changed) >= 16 and {c for c, _ in changed} >= {"transformer"}
    if fmt != "flux_xlabs":
        assert any(c.startswith("text_encoder") for c, _ in changed), "the CLIP layers were not fused"
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-6, msg=f"{fmt}: {key}")
    got_image = image(ours)
    np.testing.assert_allclose(got_image, image(theirs), atol=1e-4)
    assert np.abs(got_image - base_image).max() > 1e-2, "the LoRA should change the image"
    assert {n: p.data_ptr() for n, p in ours.transformer.named_parameters()} == ptrs  # in place

    lora.unfuse_lora(ours)
    assert all(torch.equal(v, originals[k]) for k, v in weights(ours).items())


@pytest.mark.parametrize("build", [tiny_flux, tiny_sd3], ids=["flux", "sd3"])
def test_switching_two_loras_matches_diffusers_and_unfuses_bit_exactly(build, tmp_path):
    ours, theirs, fresh = build(), build(), build()
    originals = weights(ours)
    if build is tiny_flux:
        files = {"a": save_state_dict(flux_kohya_bfl(ours), tmp_path / "a.safetensors"),
                 "b": save_state_dict(flux_xlabs(ours), tmp_path / "b.safetensors")}
    else:
        files = {name: save_state_dict(diffusers_state_dict(random_lora(lora_targets(ours), 4, seed=seed)),
                                       tmp_path / f"{name}.safetensors") for name, seed in (("a", 6), ("b", 7))}
    for name, path in files.items():
        lora.load_lora_and_optionally_fuse(ours, str(path), name, fuse=False)
        theirs.load_lora_weights(str(path), adapter_name=name)
    lora.set_and_fuse_adapters(ours, ["a"], [0.8])
    lora.set_and_fuse_adapters(ours, ["b"], [-0.6])
    lora.set_and_fuse_adapters(ours, ["a", "b"], [0.5, 1.2])

    theirs.set_adapters(["a", "b"], [0.5, 1.2])
    theirs.fuse_lora(components=theirs._lora_loadable_modules)
    theirs.unload_lora_weights()
    got, expected = weights(ours), weights(theirs)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=5e-6, msg=str(key))

    for name, path in files.items():  # switching never drifts: the same bits as fusing both at once
        lora.load_lora_and_optionally_fuse(fresh, str(path), name, fuse=False)
    lora.set_and_fuse_adapters(fresh, ["a", "b"], [0.5, 1.2])
    assert all(torch.equal(v, weights(fresh)[k]) for k, v in got.items())
    lora.unfuse_lora(ours)
    assert all(torch.equal(v, originals[k]) for k, v in weights(ours).items())


def test_fused_attention_layouts_on_flux(tmp_path):
    """onediffx leaves FLUX's joint attention unfused (``fuse_qkv`` is a no-op); a pipeline fused by
    diffusers' own ``fuse_qkv_projections`` takes a LoRA on to_q/k/v into ``to_qkv`` (the unfused
    model with the same LoRA is the oracle) and refuses one on the context projections it no longer reads."""
    plain, ours, fused = tiny_flux(), tiny_flux(), tiny_flux()
    assert fuse_qkv(ours.transformer) == 0
    assert not any(getattr(m, "fused_projections", False) for m in ours.transformer.modules())
    fused.transformer.fuse_qkv_projections()
    base = image(fused)
    targets = {k: m for k, m in lora_targets(plain).items() if ".add_" not in k[1]}
    path = save_state_dict(diffusers_state_dict(random_lora(targets, 4, seed=8)), tmp_path / "qkv.safetensors")
    for pipe in (plain, ours, fused):
        lora.load_and_fuse_lora(pipe, str(path), "q", lora_scale=0.9)
    expected = image(plain)
    assert np.abs(expected - base).max() > 1e-2
    np.testing.assert_array_equal(image(ours), expected)
    np.testing.assert_allclose(image(fused), expected, atol=1e-5, rtol=0)
    lora.unfuse_lora(fused)
    np.testing.assert_array_equal(image(fused), base)

    context = save_state_dict(flux_diffusers(plain), tmp_path / "context.safetensors")
    with pytest.raises(LoraMismatchError, match="added projections are fused"):
        lora.load_and_fuse_lora(fused, str(context))


def test_kohya_flux_layers_outside_the_blocks_and_cached_clip_factors(tmp_path):
    """diffusers' FLUX converter leaves ``img_in`` (x_embedder) unprefixed, and its own loader then drops
    it: onediffx fuses it into the transformer (checked by hand). Its CLIP half scales factors in place;
    with ``use_cache`` a second load must still read the file's factors, not scaled ones."""
    pipe = tiny_flux()
    x_embedder = pipe.transformer.x_embedder.weight.detach().clone()
    state_dict = flux_kohya_bfl(pipe)
    gen = torch.Generator().manual_seed(10)
    down, up = torch.randn(4, x_embedder.shape[1], generator=gen), torch.randn(x_embedder.shape[0], 4, generator=gen)
    state_dict.update({"lora_unet_img_in.lora_down.weight": down, "lora_unet_img_in.lora_up.weight": up,
                       "lora_unet_img_in.alpha": torch.tensor(2.0)})
    path = save_state_dict(state_dict, tmp_path / "img_in.safetensors")
    try:
        lora.load_and_fuse_lora(pipe, str(path), "k", lora_scale=0.5, use_cache=True)
        first = weights(pipe)
        torch.testing.assert_close(pipe.transformer.x_embedder.weight, x_embedder + 0.5 * (2.0 / 4) * (up @ down),
                                   rtol=0, atol=1e-6)
        lora.delete_adapters(pipe)
        lora.load_and_fuse_lora(pipe, str(path), "k", lora_scale=0.5, use_cache=True)
        assert all(torch.equal(v, first[k]) for k, v in weights(pipe).items())
    finally:
        lora.clear_cache()


def _sdxl_lora(tmp_path):
    return save_kohya(random_lora(lora_targets(tiny_sdxl()), 4, seed=9), tmp_path / "sdxl_style.safetensors")


def _flux_lora(tmp_path):
    return save_state_dict(flux_kohya_bfl(tiny_flux()), tmp_path / "flux_style.safetensors")


def _full_size_flux_lora(tmp_path):
    """FLUX.1-dev's shapes (3072 wide) in diffusers format: every layer named right, none the right size."""
    key = "transformer.transformer_blocks.0.attn.to_q"
    return save_state_dict({f"{key}.lora_A.weight": torch.zeros(4, 3072), f"{key}.lora_B.weight": torch.zeros(3072, 4)},
                           tmp_path / "flux_dev.safetensors")


def _full_size_kohya_linear1(tmp_path):
    """sd-scripts' single-block ``linear1`` at tiny size: diffusers' converter splits it at FLUX.1's."""
    return save_state_dict({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 32),
                            "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(224, 4),
                            "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(4.0)},
                           tmp_path / "linear1.safetensors")


def _sd3_kohya(tmp_path):
    return save_state_dict({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 32),
                            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(96, 4),
                            "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0)},
                           tmp_path / "sd3_kohya.safetensors")


BAD = {
    "sdxl_lora_on_flux": (tiny_flux, _sdxl_lora, LoraMismatchError,
                          "is for a UNet (SD 1.5/SDXL); this pipeline's denoiser is a FluxTransformer2DModel"),
    "flux_lora_on_sdxl": (tiny_sdxl, _flux_lora, LoraMismatchError,
                          "is for FLUX.1; this pipeline's denoiser is a UNet2DConditionModel"),
    "flux_lora_on_sd3": (tiny_sd3, _flux_lora, LoraMismatchError,
                         "is for FLUX.1; this pipeline's denoiser is a SD3Transformer2DModel"),
    "full_size_flux_lora_on_tiny": (tiny_flux, _full_size_flux_lora, LoraMismatchError,
                                    "does not fit this FluxPipeline: 1 layers, 1 of other shape"),
    "kohya_linear1_of_other_size": (tiny_flux, _full_size_kohya_linear1, LoraFormatError,
                                    "layer sizes are not the ones diffusers' converter assumes"),
    "sd3_kohya_names": (tiny_sd3, _sd3_kohya, LoraFormatError, "has no converter for on StableDiffusion3Pipeline"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_is_one_line_naming_the_file(case, tmp_path):
    build, make, error, reason = BAD[case]
    pipe = build()
    path = make(tmp_path)
    before = weights(pipe) if build is not tiny_sdxl else None
    with pytest.raises(error) as info:
        lora.load_and_fuse_lora(pipe, str(path))
    message = str(info.value)
    assert isinstance(info.value, OnediffxError)
    assert "\n" not in message and str(path) in message and reason in message, message
    if before is not None:
        assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())


def test_run_fuses_a_flux_lora_given_by_path(tmp_path):
    """``onediffx run model=tiny_flux +lora.mine.source=<file>``: the CLI's image is the Python API's."""
    import json

    from PIL import Image

    from conftest import job_dirs, run_cli

    pipe = tiny_flux()
    path = save_state_dict(flux_kohya_bfl(pipe), tmp_path / "mine.safetensors")
    proc = run_cli("run", "model=tiny_flux", "steps=2", "height=32", "width=32", f"+lora.mine.source={path}",
                   "+lora.mine.scale=0.8", "+lora.mine.base=flux_dev", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (job,) = job_dirs(tmp_path / "outputs")
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["stages"]["lora-fuse"]["adapters"] == {"mine": 0.8}
    got = np.asarray(Image.open(job / metrics["outputs"][0]), dtype=np.int16)

    def api_image(p) -> np.ndarray:
        p.set_progress_bar_config(disable=True)
        out = p(prompt=["a photo of an astronaut riding a horse on the moon"], height=32, width=32,
                num_inference_steps=2, guidance_scale=3.5, generator=[torch.Generator().manual_seed(0)],
                output_type="pil")
        return np.asarray(out.images[0], dtype=np.int16)

    base = api_image(pipe)
    lora.load_and_fuse_lora(pipe, str(path), "mine", lora_scale=0.8)
    assert np.abs(got - api_image(pipe)).max() <= 1
    assert np.abs(got - base).max() > 2, "the LoRA should change the image"

    sdxl = _sdxl_lora(tmp_path)
    (tmp_path / "bad").mkdir()
    proc = run_cli("run", "model=tiny_flux", "steps=2", "height=32", "width=32", f"+lora.bad.source={sdxl}",
                   cwd=tmp_path / "bad")
    assert proc.returncode != 0
    assert f"lora.bad: LoRA {sdxl} is for a UNet (SD 1.5/SDXL)" in proc.stderr, proc.stderr[-2000:]
