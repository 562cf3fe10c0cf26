"""The LoRA engine against diffusers' own load_lora_weights + fuse_lora, format by format.

Every LoRA here is a real safetensors file written by the test (or by diffusers/PEFT themselves)
with seeded factors, loaded into the tiny SD / SDXL pipelines. diffusers is the oracle for the
fused weights and the images; onediffx must also unfuse bit-exactly and never drift.
"""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import onediffx.lora as lora
from onediffx.lora import sources
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sd, tiny_sdxl

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_OLD_UNET = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
_OLD_TE = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}


def image(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe("a cat", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np").images


def weights(pipe) -> dict:
    return {(c, n): p.detach().clone() for c in COMPONENTS if getattr(pipe, c, None) is not None
            for n, p in getattr(pipe, c).named_parameters()}


def conv_alpha(key, rank):
    """LoCon files carry a separate conv alpha; attention alphas differ from the rank too."""
    return 2.0 if key[1].endswith(("conv1", "conv2", "conv_shortcut", ".conv")) else 8.0


# --- writers: one LoRA, many file formats ------------------------------------------------------


def write_kohya_sd(pipe, path):
    layers = random_lora(lora_targets(pipe), 4, seed=1, alpha=conv_alpha)
    return save_kohya(layers, path, te_prefixes=("lora_te_", "lora_te2_")), None


def write_kohya_sdxl_sgm(pipe, path):
    layers = random_lora(lora_targets(pipe), 4, seed=2, alpha=conv_alpha)
    return save_kohya(layers, path, sgm_layers_per_block=pipe.unet.config.layers_per_block), None


def _save(state_dict, path):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def write_diffusers_old(pipe, path):
    """Attention-processor era: ``attn1.processor.to_q_lora.down``, ``self_attn.to_q_lora.down``."""
    state_dict = {}
    for (component, module), layer in random_lora(lora_targets(pipe), 4, seed=3).items():
        if component == "unet":
            m = re.match(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out\.0)$", module)
            base = f"unet.{m[1]}.processor.{_OLD_UNET[m[2]]}" if m else f"unet.{module}.lora"
        else:
            m = re.match(r"(.+\.self_attn)\.(q_proj|k_proj|v_proj|out_proj)$", module)
            base = f"{component}.{m[1]}.{_OLD_TE[m[2]]}" if m else f"{component}.{module}.lora_linear_layer"
        state_dict[f"{base}.down.weight"], state_dict[f"{base}.up.weight"] = layer.down, layer.up
    return _save(state_dict, path), None


def write_diffusers_lora_down(pipe, path):
    """LoRACompatibleLinear era: ``to_q.lora.down.weight``, ``q_proj.lora_linear_layer.down.weight``."""
    state_dict = {}
    for (component, module), layer in random_lora(lora_targets(pipe), 4, seed=4).items():
        base = f"unet.{module}.lora" if component == "unet" else f"{component}.{module}.lora_linear_layer"
        state_dict[f"{base}.down.weight"], state_dict[f"{base}.up.weight"] = layer.down, layer.up
    return _save(state_dict, path), None


def write_diffusers_peft(pipe, path):
    """Today's diffusers files (``lora_A``/``lora_B``), written by diffusers with its alpha metadata."""
    alpha_of = lambda key, rank: 2.0 if key[1].endswith("attn2.to_k") else 8.0  # noqa: E731
    layers = random_lora(lora_targets(pipe, conv=False), 4, seed=5, alpha=alpha_of)
    per_component, metadata = {}, {}
    for (component, module), layer in layers.items():
        part = per_component.setdefault(component, {})
        part[f"{module}.lora_A.weight"], part[f"{module}.lora_B.weight"] = layer.down, layer.up
    for component, part in per_component.items():
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in part})
        metadata[component] = {"r": 4, "lora_alpha": 8, "target_modules": modules, "rank_pattern": {},
                               "alpha_pattern": {"attn2.to_k": 2} if component == "unet" else {}}
    type(pipe).save_lora_weights(
        path.parent, unet_lora_layers=per_component["unet"], text_encoder_lora_layers=per_component["text_encoder"],
        text_encoder_2_lora_layers=per_component["text_encoder_2"], weight_name=path.name,
        unet_lora_adapter_metadata=metadata["unet"], text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metadata["text_encoder_2"],
    )
    return path, None


def write_peft_folder(pipe, path):
    """A PEFT adapter folder (``base_model.model.`` keys, ``adapter_config.json`` with rsLoRA)."""
    from peft import LoraConfig

    layers = random_lora(lora_targets(pipe, components=("unet",)), 4, seed=6, alpha=lambda k, r: 3.0 ** 0.5 * 2)
    folder = path.parent / "peft_adapter"
    folder.mkdir()
    modules = sorted(m for _, m in layers)
    config = {"r": 4, "lora_alpha": 4, "target_modules": modules, "use_rslora": True}
    LoraConfig(**config).save_pretrained(str(folder))
    state_dict = {}
    for (_, module), layer in layers.items():
        state_dict[f"base_model.model.{module}.lora_A.weight"] = layer.down
        state_dict[f"base_model.model.{module}.lora_B.weight"] = layer.up
    _save(state_dict, folder / "adapter_model.safetensors")
    return folder, config


FORMATS = {
    "kohya_sd15": (tiny_sd, write_kohya_sd),
    "kohya_sdxl_sgm": (tiny_sdxl, write_kohya_sdxl_sgm),
    "diffusers_old": (tiny_sd, write_diffusers_old),
    "diffusers_lora_down": (tiny_sdxl, write_diffusers_lora_down),
    "diffusers_peft": (tiny_sdxl, write_diffusers_peft),
    "peft_folder": (tiny_sd, write_peft_folder),
}


def diffusers_fuse(pipe, source, peft_config, scale):
    """The oracle: diffusers (PEFT backend) loads, fuses at ``scale`` and drops its LoRA layers."""
    if peft_config is None:
        pipe.load_lora_weights(str(source.parent), weight_name=source.name)
        pipe.fuse_lora(lora_scale=scale)
    else:  # a bare PEFT adapter: diffusers loads it into the UNet it was made for
        from safetensors.torch import load_file

        state_dict = {k.removeprefix("base_model.model."): v
                      for k, v in load_file(str(source / "adapter_model.safetensors")).items()}
        metadata = {"rank_pattern": {}, "alpha_pattern": {}, **peft_config}  # as adapter_config.json has them
        pipe.unet.load_lora_adapter(state_dict, prefix=None, metadata=metadata)
        pipe.fuse_lora(components=["unet"], lora_scale=scale)
    pipe.unload_lora_weights()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fused_weights_and_image_match_diffusers(fmt, tmp_path):
    build, write = FORMATS[fmt]
    ours, theirs = build(), build()
    source, peft_config = write(ours, tmp_path / "lora.safetensors")
    base_image, originals = image(ours), weights(ours)
    ptrs = {n: p.data_ptr() for n, p in ours.unet.named_parameters()}
    modules = [type(m) for m in ours.unet.modules()]

    diffusers_fuse(theirs, source, peft_config, 0.7)
    lora.load_and_fuse_lora(ours, str(source), lora_scale=0.7)

    expected, got = weights(theirs), weights(ours)
    changed = [k for k in got if not torch.equal(got[k], originals[k])]
    assert len(changed) >= 40, "the LoRA should touch many layers"
    components = {c for c, _ in changed}
    assert "unet" in components and (fmt == "peft_folder" or len(components) >= 2)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-6, msg=f"{fmt}: {key}")
    got_image = image(ours)
    np.testing.assert_allclose(got_image, image(theirs), atol=1e-4)
    assert np.abs(got_image - base_image).max() > 1e-2, "the LoRA should change the image"
    # in place: same modules, same storage
    assert [type(m) for m in ours.unet.modules()] == modules
    assert {n: p.data_ptr() for n, p in ours.unet.named_parameters()} == ptrs

    lora.unfuse_lora(ours)
    assert all(torch.equal(v, originals[k]) for k, v in weights(ours).items())


def test_several_adapters_match_diffusers_set_adapters(tmp_path):
    ours, theirs = tiny_sdxl(), tiny_sdxl()
    files = {
        "a": write_kohya_sdxl_sgm(ours, tmp_path / "a.safetensors")[0],
        "b": write_diffusers_peft(ours, tmp_path / "b.safetensors")[0],
        "c": write_diffusers_lora_down(ours, tmp_path / "c.safetensors")[0],
    }
    names, scales = ["a", "b", "c"], [0.5, 1.0, -0.7]
    for name, path in files.items():
        theirs.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        lora.load_lora_and_optionally_fuse(ours, str(path), name, fuse=False)
    theirs.set_adapters(names, scales)
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    lora.set_and_fuse_adapters(ours, names, scales)

    expected, got = weights(theirs), weights(ours)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=5e-6, msg=str(key))
    np.testing.assert_allclose(image(ours), image(theirs), atol=1e-4)


def test_adapters_at_one_coefficient_are_one_matmul_and_match_diffusers(tmp_path, monkeypatch):
    """Equal ``weight * alpha / rank`` everywhere: fuse concatenates the factors into one addmm."""
    from onediffx.lora import fuse

    ours, theirs = tiny_sdxl(), tiny_sdxl()
    targets = lora_targets(ours)
    names = ["a", "b", "c"]
    for rank, name in enumerate(names, start=2):  # ranks 2, 3, 4, all with alpha = rank / 2
        path = save_kohya(random_lora(targets, rank, seed=50 + rank, alpha=lambda key, r: r / 2),
                          tmp_path / f"{name}.safetensors", sgm_layers_per_block=ours.unet.config.layers_per_block)
        theirs.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        lora.load_lora_and_optionally_fuse(ours, str(path), name, fuse=False)
    matmuls, products = [], fuse._products

    def counting(*args):
        result = products(*args)
        matmuls.append(len(result))
        return result

    monkeypatch.setattr(fuse, "_products", counting)
    theirs.set_adapters(names, [0.8] * 3)
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    lora.set_and_fuse_adapters(ours, names, 0.8)

    assert matmuls and set(matmuls) == {1}
    expected, got = weights(theirs), weights(ours)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=5e-6, msg=str(key))
    np.testing.assert_allclose(image(ours), image(theirs), atol=1e-4)


def test_fifty_random_switches_never_drift_and_unfuse_is_bit_exact(tmp_path):
    pipe = tiny_sd()
    originals = weights(pipe)
    targets = lora_targets(pipe)
    names = ["a", "b", "c", "d"]
    for seed, name in enumerate(names):
        path = save_kohya(random_lora(targets, 2 + seed, seed=10 + seed, alpha=conv_alpha),
                          tmp_path / f"{name}.safetensors", te_prefixes=("lora_te_", ""))
        lora.load_lora_and_optionally_fuse(pipe, str(path), name, fuse=False, use_cache=True,
                                           offload_device="cpu", offload_weight="weight" if seed % 2 else "lora")
    rng = random.Random(0)
    for step in range(50):
        chosen = rng.sample(names, rng.randint(0, len(names)))
        if step % 10 == 9:  # drop one adapter and load it again from the in-memory cache
            lora.delete_adapters(pipe, chosen[:1] or ["a"])
            lora.load_lora_and_optionally_fuse(pipe, str(tmp_path / f"{(chosen[:1] or ['a'])[0]}.safetensors"),
                                               (chosen[:1] or ["a"])[0], fuse=False, use_cache=True)
        lora.set_and_fuse_adapters(pipe, chosen, [rng.uniform(-1.5, 1.5) for _ in chosen])

    lora.set_and_fuse_adapters(pipe, ["d", "b"], [-0.9, 0.3])  # order of the call does not matter
    fresh = tiny_sd()
    for name in ("b", "d"):
        lora.load_lora_and_optionally_fuse(fresh, str(tmp_path / f"{name}.safetensors"), name, fuse=False)
    lora.set_and_fuse_adapters(fresh, ["b", "d"], [0.3, -0.9])
    switched, direct = weights(pipe), weights(fresh)
    assert any(not torch.equal(switched[k], originals[k]) for k in switched)
    assert all(torch.equal(switched[k], direct[k]) for k in switched), "switching drifted"

    lora.unfuse_lora(pipe)
    assert all(torch.equal(v, originals[k]) for k, v in weights(pipe).items())


def test_channels_last_weights_fuse_like_contiguous_ones(tmp_path):
    """The compile stage may make conv weights channels_last: fusing must not assume contiguity."""
    pipe, reference = tiny_sd(), tiny_sd()
    pipe.unet.to(memory_format=torch.channels_last)
    originals = weights(pipe)
    path = save_kohya(random_lora(lora_targets(pipe), 4, seed=7, alpha=conv_alpha), tmp_path / "cl.safetensors",
                      te_prefixes=("lora_te_", ""))
    lora.load_and_fuse_lora(pipe, str(path), lora_scale=0.8)
    lora.load_and_fuse_lora(reference, str(path), lora_scale=0.8)
    got, expected = weights(pipe), weights(reference)
    assert pipe.unet.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    lora.unfuse_lora(pipe)
    assert all(torch.equal(v, originals[k]) for k, v in weights(pipe).items())


def test_stacked_load_and_fuse_equals_one_combined_fuse(tmp_path):
    """load_and_fuse_lora twice combines from W0 (OneDiffX's precision note no longer applies)."""
    pipe, other = tiny_sdxl(), tiny_sdxl()
    targets = lora_targets(pipe)
    paths = [save_kohya(random_lora(targets, 4, seed=s), tmp_path / f"{s}.safetensors") for s in (20, 21)]
    lora.load_and_fuse_lora(pipe, str(paths[0]), "x", lora_scale=0.4)
    lora.load_and_fuse_lora(pipe, str(paths[1]), "y", lora_scale=0.9)
    for name, path in zip("xy", paths):
        lora.load_lora_and_optionally_fuse(other, str(path), name, fuse=False)
    lora.set_and_fuse_adapters(other, ["x", "y"], [0.4, 0.9])
    a, b = weights(pipe), weights(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # an adapter name that is already loaded is ignored, as in OneDiffX
    with pytest.warns(UserWarning, match="already loaded"):
        lora.load_and_fuse_lora(pipe, str(paths[0]), "x", lora_scale=5.0)
    assert all(torch.equal(v, a[k]) for k, v in weights(pipe).items())
    # deleting a fused adapter leaves exactly the other one
    lora.delete_adapters(pipe, "x")
    lora.set_and_fuse_adapters(other, ["y"], [0.9])
    a, b = weights(pipe), weights(other)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_use_cache_loads_again_without_reading_the_file(tmp_path, monkeypatch):
    pipe = tiny_sdxl()
    path = save_kohya(random_lora(lora_targets(pipe), 4, seed=30), tmp_path / "c.safetensors")
    lora.load_and_fuse_lora(pipe, str(path), "c", use_cache=True)
    fused = weights(pipe)
    lora.delete_adapters(pipe)

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was read again")

    monkeypatch.setattr(sources, "_read_safetensors", no_reading)
    try:
        lora.load_and_fuse_lora(pipe, str(path), "c", use_cache=True)
        assert all(torch.equal(v, fused[k]) for k, v in weights(pipe).items())
        lora.unfuse_lora(pipe)
        lora.set_and_fuse_adapters(pipe, "c")  # switching reads nothing either
        assert all(torch.equal(v, fused[k]) for k, v in weights(pipe).items())
    finally:
        sources.clear_cache()


def test_state_dict_source_and_foreign_weight_writes(tmp_path):
    """A state dict works as a source; weights rewritten by someone else become the new W0."""
    from onediffx.lora.synthetic import kohya_state_dict

    pipe = tiny_sd()
    layers = random_lora(lora_targets(pipe), 4, seed=40)
    lora.load_and_fuse_lora(pipe, kohya_state_dict(layers, te_prefixes=("lora_te_", "")), "sd", lora_scale=1.0)
    new_base = {k: v + 0.01 for k, v in pipe.unet.state_dict().items()}
    pipe.unet.load_state_dict(new_base)  # e.g. a fine-tune loaded over the fused pipeline
    lora.unfuse_lora(pipe)
    assert all(torch.equal(v, new_base[k]) for k, v in pipe.unet.state_dict().items())


def test_update_graph_with_constant_folding_info_is_a_documented_no_op():
    pipe = tiny_sd()
    before = weights(pipe)
    assert lora.update_graph_with_constant_folding_info(pipe.unet) is None
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())
    assert "freezing" in lora.update_graph_with_constant_folding_info.__doc__


def test_peft_config_alpha_is_read_from_the_folder(tmp_path):
    """rsLoRA scale alpha/sqrt(r) from adapter_config.json, checked on one layer by hand."""
    pipe = tiny_sd()
    folder, config = write_peft_folder(pipe, tmp_path / "unused.safetensors")
    layer = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    original = layer.weight.detach().clone()
    lora.load_and_fuse_lora(pipe, str(folder))
    from safetensors.torch import load_file

    sd = load_file(str(folder / "adapter_model.safetensors"))
    a = sd["base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"]
    b = sd["base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"]
    expected = original + (config["lora_alpha"] / config["r"] ** 0.5) * (b @ a)
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
