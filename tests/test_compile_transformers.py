"""Compile and the graph cache on the tiny FLUX and SD3 transformers (Inductor on the CPU).

Oracles as for the UNet (``test_compile.py``): the compiled image against eager, and a restart in a
fresh process (the real CLI) that loads the saved graphs, compiles nothing and gives the same
image. FLUX compiles whole; SD3 compiles regionally (its joint blocks, which diffusers' class does
not list in ``_repeated_blocks``). One compile of each, shared by the module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import job_dirs, run_cli
from onediffx.compile import compile_options, compile_pipe, compile_state, load_pipe, save_pipe
from onediffx.compile.regions import region_names
from onediffx.models.tiny import tiny_flux, tiny_sd3

pytestmark = pytest.mark.slow
PROMPT = "a photo of an astronaut riding a horse on the moon"  # the CLI's default
COMMON = ["steps=2", "height=64", "width=64"]


def _image(pipe, guidance: float) -> np.ndarray:
    import torch

    out = pipe(prompt=[PROMPT], height=64, width=64, num_inference_steps=2, guidance_scale=guidance,
               generator=[torch.Generator().manual_seed(0)], output_type="pil")
    return np.asarray(out.images[0], dtype=np.int16)


def _cli_image(root) -> tuple[np.ndarray, dict]:
    (job,) = job_dirs(root / "outputs")
    metrics = json.loads((job / "metrics.json").read_text())
    return np.asarray(Image.open(job / metrics["outputs"][0]), dtype=np.int16), metrics


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    pipe = tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    eager = _image(pipe, 3.5)
    compile_pipe(pipe, "inductor", compile_options("inductor", components=["transformer"]))
    compiled = _image(pipe, 3.5)
    cache_dir = tmp_path_factory.mktemp("flux-graphs")
    written = save_pipe(pipe, str(cache_dir))
    return dict(pipe=pipe, eager=eager, compiled=compiled, cache_dir=cache_dir, written=written)


def test_whole_flux_transformer_compiles_to_eagers_image(flux):
    assert set(compile_state(flux["pipe"]).saveable) == {"transformer"}
    assert flux["written"]["transformer"]["graphs"] == 1
    assert np.abs(flux["compiled"] - flux["eager"]).max() <= 2


def test_flux_restart_loads_the_graph_and_compiles_nothing(flux, tmp_path):
    proc = run_cli("run", "model=tiny_flux", "compile=inductor", "compile.components=[transformer]",
                   f"cache.dir={flux['cache_dir']}", *COMMON, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    image, metrics = _cli_image(tmp_path)
    assert metrics["stages"]["load-graph"]["hit"] is True
    assert metrics["compile_counters"]["graphs_compiled"] == 0 and metrics["compile_counters"]["dynamo_graphs"] == 0
    assert np.abs(image - flux["compiled"]).max() <= 1


def test_python_api_round_trip_on_a_fresh_flux_pipeline(flux):
    """``compile_pipe`` + ``load_pipe`` on a new FLUX pipeline: the saved graph, no compile, the same image."""
    pipe = tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    compile_pipe(pipe, "inductor", compile_options("inductor", components=["transformer"]))
    found = load_pipe(pipe, str(flux["cache_dir"]))
    assert found["transformer"]["hit"] is True and found["transformer"]["graphs"] == 1
    assert np.array_equal(_image(pipe, 3.5), flux["compiled"])
    assert compile_state(pipe).saveable["transformer"].compiles == 0


def test_repeated_blocks_name_each_transformers_blocks():
    """``repeated`` is diffusers' ``_repeated_blocks``, and SD3's joint blocks where diffusers lists none."""
    assert region_names(tiny_flux().transformer, ["repeated", "ResnetBlock2D"]) == [
        "FluxTransformerBlock", "FluxSingleTransformerBlock", "ResnetBlock2D"]
    assert region_names(tiny_sd3().transformer, []) == ["JointTransformerBlock"]


def test_sd3_regional_graphs_restart_without_compiling(tmp_path):
    """``compile=regional_aot`` on SD3: a graph set per joint-block structure, saved, loaded by a restart."""
    eager = tiny_sd3()
    eager.set_progress_bar_config(disable=True)
    reference = _image(eager, 5.0)
    common = ["run", "model=tiny_sd3", "compile=regional_aot", "compile.components=[transformer]",
              f"cache.dir={tmp_path / 'graphs'}", *COMMON]
    images, metrics = [], []
    for run in ("cold", "restart"):
        (tmp_path / run).mkdir()
        proc = run_cli(*common, cwd=tmp_path / run)
        assert proc.returncode == 0, proc.stderr[-2000:]
        image, facts = _cli_image(tmp_path / run)
        images.append(image)
        metrics.append(facts)
    cold, restart = metrics
    blocks = list(cold["stages"]["load-graph"]["components"])
    assert blocks and all(p.startswith("transformer.transformer_blocks.") for p in blocks)
    assert cold["compile_counters"]["graphs_compiled"] == len(blocks)
    assert restart["stages"]["load-graph"]["hit"] is True
    assert restart["compile_counters"]["graphs_compiled"] == 0 and restart["compile_counters"]["dynamo_graphs"] == 0
    assert np.abs(images[1] - images[0]).max() <= 1
    assert np.abs(images[0] - reference).max() <= 2


def test_deepcache_on_a_transformer_is_one_line_naming_stepcache(compose_run):
    from onediffx.errors import ConfigError
    from onediffx.resolver import assemble

    with pytest.raises(ConfigError, match=r"^deepcache: works on UNets; .*FluxTransformer2DModel.*stepcache=") as err:
        assemble(compose_run("model=tiny_flux", "deepcache=i3"))
    assert "\n" not in str(err.value)


def test_flux_alternates_warmed_resolutions_without_recompiling(flux):
    """Two sizes, each compiled once: alternating between them afterwards compiles nothing more and
    gives each size's image again (as for the UNet in ``test_compile.py``)."""
    import torch

    pipe = flux["pipe"]

    def image(height: int, width: int) -> np.ndarray:
        out = pipe(prompt=[PROMPT], height=height, width=width, num_inference_steps=2, guidance_scale=3.5,
                   generator=[torch.Generator().manual_seed(0)], output_type="pil")
        return np.asarray(out.images[0], dtype=np.int16)

    first = {size: image(*size) for size in ((64, 64), (32, 64))}
    compiles = compile_state(pipe).saveable["transformer"].compiles
    for size in ((64, 64), (32, 64), (64, 64), (32, 64)):
        assert np.array_equal(image(*size), first[size])
    assert compile_state(pipe).saveable["transformer"].compiles == compiles
