"""LoRA switching on a torch.compile'd (Inductor) UNet: new images, no recompilation.

Inductor passes parameters to the compiled graph as inputs, and onediffx writes fused weights into
the parameters' own storage, so the compiled graph sees every switch. The UNet compiles once for
the whole module (about a minute cold on a small CPU; Inductor's FX cache makes reruns faster).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import onediffx.lora as lora
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sd


def image(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe("a cat", num_inference_steps=2, height=64, width=64, generator=gen, output_type="np").images


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch._dynamo.reset()
    pipe, eager = tiny_sd(), tiny_sd()
    pipe.unet = torch.compile(pipe.unet, backend="inductor", fullgraph=True, dynamic=False)
    folder = tmp_path_factory.mktemp("loras")
    targets = lora_targets(eager)
    files = {name: save_kohya(random_lora(targets, 4, seed=seed, strength=0.5), folder / f"{name}.safetensors",
                              te_prefixes=("lora_te_", ""))
             for seed, name in enumerate(("a", "b"))}
    base = image(pipe)  # compiles here, once
    return pipe, eager, files, base


def test_switching_changes_output_without_recompiling(compiled):
    pipe, eager, files, base = compiled
    np.testing.assert_allclose(base, image(eager), atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for name, path in files.items():
        lora.load_lora_and_optionally_fuse(pipe, str(path), name, fuse=False, offload_device="cuda")
        lora.load_lora_and_optionally_fuse(eager, str(path), name, fuse=False)

    seen = [base]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for names, scales in ((["a"], [1.0]), (["b"], [0.8]), (["a", "b"], [0.6, -0.6])):
            lora.set_and_fuse_adapters(pipe, names, scales)
            lora.set_and_fuse_adapters(eager, names, scales)
            got = image(pipe)
            np.testing.assert_allclose(got, image(eager), atol=1e-4, err_msg=str(names))
            assert min(np.abs(got - prev).max() for prev in seen) > 1e-2, f"{names} did not change the output"
            seen.append(got)
        lora.unfuse_lora(pipe)
        np.testing.assert_allclose(image(pipe), base, atol=1e-6)
        lora.load_and_fuse_lora(pipe, str(files["a"]), "a2", lora_scale=1.0, offload_device="cpu")
        np.testing.assert_allclose(image(pipe), seen[1], atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs, "a LoRA switch recompiled the UNet"
