"""``compile.progressive``: first images from regional graphs, then the whole-component graphs a real
background process compiled into the cache; a restart loads those and starts nothing.

Oracle: the eager pipeline's image at the same seed, before and after the switch.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import as_array, run_cli
from onediffx.compile import compile_state
from onediffx.compile.pipe import compile_counters
from onediffx.errors import ConfigError
from onediffx.generate import Settings, generate
from onediffx.resolver import assemble, plan

pytestmark = pytest.mark.slow


def _image(asm) -> np.ndarray:
    return as_array(generate(asm, Settings.from_config(asm.cfg)).images[0])


def test_serves_regional_then_switches_to_the_background_graphs(compose_run, tmp_path):
    eager = _image(assemble(compose_run("compile=none")))
    asm = assemble(compose_run("compile=progressive", f"cache.dir={tmp_path}"))
    pending = asm.progressive
    assert compile_state(asm.pipe).options.regional  # serving regional graphs while the rest compiles
    assert np.abs(_image(asm) - eager).max() <= 2

    assert pending.wait() == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"unet", "vae.decoder"}  # the background's entries
    assert not list(tmp_path.glob("progressive-*"))  # its config and log are cleaned up
    after = _image(asm)  # this call switches first
    facts = asm.report["progressive"]
    assert facts["switched"] and facts["missed"] == [] and facts["background_s"] > 0
    state = compile_state(asm.pipe)
    assert not state.options.regional and set(state.saveable) == {"unet", "vae.decoder"}
    counters = compile_counters(asm.pipe)
    assert counters["graphs_compiled"] == 0 and counters["graphs_loaded"] == 2  # loaded, not compiled here
    assert np.abs(after - eager).max() <= 2
    assert asm.progressive is None

    # a restart, in a fresh process: whole-component graphs from the cache, no background compile
    proc = run_cli("run", "compile=progressive", f"cache.dir={tmp_path}", f"hydra.run.dir={tmp_path / 'restart'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "restart" / "metrics.json").read_text())
    assert metrics["stages"]["load-graph"]["hit"] and "progressive" not in metrics["stages"]
    assert metrics["compile_counters"]["graphs_compiled"] == 0
    restart_image = as_array(Image.open(tmp_path / "restart" / metrics["outputs"][0]))
    assert np.abs(restart_image - eager).max() <= 2


@pytest.mark.parametrize("override, needed", [("deepcache=i3", "deepcache=off"), ("cache=off", "cache.enabled=true"),
                                              ("compile.graph=dynamo", "compile.graph=aot")])
def test_what_progressive_needs_is_one_line(compose_run, override, needed):
    with pytest.raises(ConfigError, match=f"compile.progressive: needs {needed}"):
        plan(compose_run("compile=progressive", override))


def test_interim_regions_are_the_blocks_the_pipeline_has():
    from onediffx.compile import compile_options
    from onediffx.stages.progressive import interim_regions
    from onediffx.models.tiny import tiny_sd

    options = compile_options("progressive")
    options.regions = []
    assert interim_regions(tiny_sd(), options) == ["BasicTransformerBlock", "ResnetBlock2D"]
    sd = tiny_sd()
    assert interim_regions(SimpleNamespace(vae=sd.vae), options) == ["ResnetBlock2D"]  # no transformer blocks
    assert interim_regions(SimpleNamespace(text_encoder=sd.text_encoder), options) == []  # nothing to serve from
    options.regions = ["Attention"]
    assert interim_regions(tiny_sd(), options) == ["Attention"]  # given names are the user's to check
