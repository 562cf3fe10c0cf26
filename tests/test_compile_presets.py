"""The compile presets: each composes to the options it always had, the ones that extend
``inductor`` included, and the library's ``compile_options(<preset>)`` reads the same."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from onediffx.compile.config import CompileConfig
from onediffx.compile.options import preset_options
from onediffx.presets import preset_names

INDUCTOR = dict(backend="inductor", mode=None, fullgraph=True, dynamic=False, regional=False, regions=[],
                channels_last=True, fuse_qkv=True, max_autotune=False, cuda_graphs=True,
                components=["unet", "transformer", "controlnet", "vae.decoder"], text_encoders=False, graph="aot",
                vae_dtype="bfloat16", progressive=False, pil_on_device=True, attention="auto",
                inductor={"conv_1x1_as_mm": True, "epilogue_fusion": False})
BLOCKS = ["repeated", "ResnetBlock2D"]
EXPECTED = {
    "inductor": INDUCTOR,
    "auto": {**INDUCTOR, "backend": "auto"},
    "inductor_max": {**INDUCTOR, "max_autotune": True, "inductor": {
        **INDUCTOR["inductor"], "coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}},
    "progressive": {**INDUCTOR, "progressive": True, "regions": BLOCKS},
    "regional": {**INDUCTOR, "regional": True, "regions": BLOCKS, "graph": "dynamo"},
    "regional_aot": {**INDUCTOR, "regional": True, "regions": BLOCKS},
    "none": {**OmegaConf.to_container(OmegaConf.structured(CompileConfig), enum_to_str=True), "backend": "none"},
}


def test_every_preset_is_covered():
    assert sorted(EXPECTED) == preset_names("compile")


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_a_preset_composes_to_the_options_it_always_had(compose_run, preset):
    composed = compose_run(f"compile={preset}").compile
    assert OmegaConf.to_container(composed, enum_to_str=True) == EXPECTED[preset]
    assert list(composed.inductor) == list(EXPECTED[preset]["inductor"])  # key order too (it is printed)
    assert preset_options(preset) == OmegaConf.to_object(composed)  # the library reads what the CLI composes
