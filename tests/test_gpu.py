"""GPU checks (``pytest -m gpu`` on the GPU machine; skipped without CUDA).

The CPU suite covers the logic; these check what only CUDA exercises: fp16 weights with the bf16
VAE of the ``inductor`` preset, Triton kernels in saved graphs, a restart on the same card, and
CUDA graphs (``onediffx.cuda_graphs``) against the uncaptured compiled forward they replay.
"""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import onediffx.lora as lora
from conftest import run_cli
from onediffx.compile import compile_options, compile_pipe, compile_state
from onediffx.compile.pipe import pipeline_modules
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sdxl

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _image(job):
    metrics = json.loads((job / "metrics.json").read_text())
    return metrics, np.asarray(Image.open(job / metrics["outputs"][0]), dtype=np.float64)


def test_compiled_fp16_run_restarts_from_the_graph_cache_on_cuda(tmp_path):
    from skimage.metrics import peak_signal_noise_ratio

    common = ["run", "model=tiny_xl", "device=cuda", "dtype=float16", "steps=4", f"cache.dir={tmp_path / 'graphs'}"]
    eager = run_cli(*common, "compile=none", "hydra.run.dir=eager", cwd=tmp_path)
    cold = run_cli(*common, "compile=inductor", "hydra.run.dir=cold", cwd=tmp_path)
    warm = run_cli(*common, "compile=inductor", "hydra.run.dir=warm", cwd=tmp_path)
    for proc in (eager, cold, warm):
        assert proc.returncode == 0, proc.stderr
    (_, reference), (cold_m, cold_img), (warm_m, warm_img) = (_image(tmp_path / d) for d in ("eager", "cold", "warm"))
    assert cold_m["compile_counters"]["graphs_compiled"] >= 2  # UNet and VAE decoder
    assert warm_m["stages"]["load-graph"]["hit"] and warm_m["compile_counters"]["graphs_compiled"] == 0
    assert warm_m["compile_counters"]["dynamo_graphs"] == 0
    assert np.abs(warm_img - cold_img).max() <= 1
    assert peak_signal_noise_ratio(reference, cold_img, data_range=255) > 30  # bf16 VAE, compiled kernels


def _generate(pipe, size=64, **kwargs):
    generator = torch.Generator("cuda").manual_seed(0)
    return pipe(prompt="a red cube", num_inference_steps=4, height=size, width=size, generator=generator,
                output_type="np", **kwargs).images


def _uncaptured(pipe, fn):
    """``fn(pipe)`` with each graphed component calling the forward its graphs replay."""
    graphed = compile_state(pipe).graphed
    modules = {"unet": pipe.unet, "vae.decoder": pipe.vae.decoder, "text_encoder": pipe.text_encoder,
               "text_encoder_2": pipe.text_encoder_2}
    saved = {path: modules[path].forward for path in graphed}
    for path, graphed in graphed.items():
        modules[path].forward = graphed.fn
    try:
        return fn(pipe)
    finally:
        for path, forward in saved.items():
            modules[path].forward = forward


def test_cuda_graphs_replay_the_compiled_forward_and_see_lora_fusing(tmp_path):
    torch._dynamo.reset()
    pipe = tiny_sdxl().to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    compile_pipe(pipe, "inductor", compile_options("inductor", cuda_graphs=True))
    graphed = compile_state(pipe).graphed
    assert set(graphed) == {"unet", "vae.decoder", "text_encoder", "text_encoder_2"}
    first, replayed = _generate(pipe), _generate(pipe)
    captures = {path: g.captures for path, g in graphed.items()}
    assert captures == {"unet": 1, "vae.decoder": 1, "text_encoder": 1, "text_encoder_2": 1}
    np.testing.assert_array_equal(first, replayed)
    np.testing.assert_array_equal(replayed, _uncaptured(pipe, _generate))  # the same kernels, launched one by one

    path = save_kohya(random_lora(lora_targets(pipe), 4, seed=5), tmp_path / "l.safetensors", dtype=torch.float16)
    lora.load_and_fuse_lora(pipe, str(path), "l", lora_scale=1.0)
    fused = _generate(pipe)
    assert np.abs(fused - replayed).max() > 1e-3  # the fused weights reached the captured graph
    np.testing.assert_array_equal(fused, _uncaptured(pipe, _generate))
    lora.unfuse_lora(pipe)
    np.testing.assert_array_equal(_generate(pipe), replayed)
    assert {path: g.captures for path, g in graphed.items()} == captures  # no capture for new weights


def test_cuda_graphs_switch_resolutions_without_growing_memory():
    torch._dynamo.reset()
    pipe = tiny_sdxl().to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    compile_pipe(pipe, "inductor", compile_options("inductor", cuda_graphs=True))
    reference = {size: _generate(pipe, size) for size in (64, 96)}
    reserved = torch.cuda.memory_reserved()
    for _ in range(3):
        for size in (64, 96):
            np.testing.assert_array_equal(_generate(pipe, size), reference[size])
    assert torch.cuda.memory_reserved() == reserved
    assert compile_state(pipe).graphed["unet"].captures == 2


def _compiled_run_then_release() -> tuple[int, list]:
    """Compile the tiny SDXL with CUDA graphs, generate twice, drop it: bytes left allocated, and
    weak references to its UNet and every parameter of the pipeline."""
    before = torch.cuda.memory_allocated()
    pipe = tiny_sdxl().to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    compile_pipe(pipe, "inductor", compile_options("inductor", cuda_graphs=True))
    _generate(pipe), _generate(pipe)
    refs = [weakref.ref(pipe.unet)] + [weakref.ref(p) for m in pipeline_modules(pipe) for p in m.parameters()]
    del pipe
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before, refs


def test_a_released_compiled_pipeline_leaves_nothing_allocated():
    """A service that swaps models must get their memory back. The first pipeline may leave cuBLAS
    workspaces (kept for the process's life, one per stream: the default one and the capture stream,
    33 MiB each on an H200); a second one, built and released the same way, must leave nothing more,
    and no parameter of either may survive."""
    torch._dynamo.reset()
    first, first_refs = _compiled_run_then_release()
    second, second_refs = _compiled_run_then_release()
    survivors = [ref() for ref in first_refs + second_refs if ref() is not None]
    assert not survivors, [type(o).__name__ if isinstance(o, torch.nn.Module) else tuple(o.shape) for o in survivors[:5]]
    assert first <= 96 * 2**20, first / 2**20  # at most two cuBLAS workspaces
    assert second == 0, second / 2**20

def test_deep_cache_passes_in_cuda_graphs_match_the_uncaptured_passes():
    from onediffx.deep_cache import StableDiffusionXLPipeline
    from onediffx.deep_cache.hook import DeepCache

    cache = dict(cache_interval=2, cache_layer_id=0, cache_block_id=1)
    images = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        pipe = StableDiffusionXLPipeline(**tiny_sdxl().components).to("cuda", torch.float16)
        pipe.set_progress_bar_config(disable=True)
        compile_pipe(pipe, "inductor", compile_options("inductor", cuda_graphs=graphs))
        images[graphs] = [_generate(pipe, **cache) for _ in range(2)]
        if graphs:
            state = DeepCache.of(pipe.unet)
            assert state.full_pass.captures == 1 and state.shallow_pass.captures == 1
    np.testing.assert_array_equal(images[True][0], images[True][1])
    np.testing.assert_allclose(images[True][1], images[False][1], atol=2e-2, rtol=0)


def test_progressive_start_switches_from_graphed_regions_to_whole_graphs_on_cuda(compose_run, tmp_path):
    """CUDA-graphed regional forwards are removed and the whole-component graphs captured anew."""
    from onediffx.generate import Settings, generate
    from onediffx.hooks import COMPILED, has_hook
    from onediffx.resolver import assemble

    common = ["model=tiny_xl", "device=cuda", "dtype=float16", "steps=4"]
    eager_asm = assemble(compose_run(*common, "compile=none"))
    eager = np.asarray(generate(eager_asm, Settings.from_config(eager_asm.cfg)).images[0], dtype=np.float64)
    asm = assemble(compose_run(*common, "compile=progressive", f"cache.dir={tmp_path}"))
    settings = Settings.from_config(asm.cfg)
    assert compile_state(asm.pipe).options.regional and "unet" in compile_state(asm.pipe).graphed
    regional = np.asarray(generate(asm, settings).images[0], dtype=np.float64)
    assert asm.progressive.wait() == 0
    whole = np.asarray(generate(asm, settings).images[0], dtype=np.float64)
    state = compile_state(asm.pipe)
    assert asm.report["progressive"]["switched"] and not state.options.regional
    assert "unet" in state.saveable and "unet" in state.graphed  # whole graphs, captured again
    assert not any(has_hook(m, COMPILED) for m in asm.pipe.unet.modules() if m is not asm.pipe.unet)  # no regions
    from skimage.metrics import peak_signal_noise_ratio

    for image in (regional, whole):
        assert peak_signal_noise_ratio(eager, image, data_range=255) > 30  # bf16 VAE, as the restart test


def test_compile_attention_picks_the_kernel_traced_into_the_graph():
    """``compile.attention=cudnn`` and ``flash`` trace different kernels into the graph, each in a fresh
    graph (AOTAutograd's cache, keyed by the Dynamo graph alone, must not hand one the other's)."""
    from onediffx.bench.measure import attention_kernels

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN's fused attention is the auto choice on Hopper and newer only")
    launched = {choice: attention_kernels(choice, torch.device("cuda")) for choice in ("cudnn", "flash")}
    assert any("cudnn" in name for name in launched["cudnn"]), launched
    assert launched["flash"] and not any("cudnn" in name for name in launched["flash"]), launched
