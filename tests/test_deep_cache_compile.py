"""DeepCache under ``torch.compile`` (Inductor): two graphs, traced once, close to eager.

The UNet is compiled whole, the way a user or the compile stage does it, before any cached call:
the dispatcher must keep its step counter out of the graphs so that the full and the shallow pass
each compile once, whatever the step, the call or the number of steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from onediffx.deep_cache import StableDiffusionPipeline
from onediffx.models.tiny import tiny_sd

pytestmark = pytest.mark.slow

CACHE = dict(cache_interval=2, cache_layer_id=0, cache_block_id=1)


def generate(pipe, steps: int, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt="a red cube", num_inference_steps=steps, height=64, width=64, generator=generator,
                output_type="np", **kwargs).images


def deep_cache_pipe() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(**tiny_sd().components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def runs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager = deep_cache_pipe()
        expected = {steps: generate(eager, steps, **CACHE) for steps in (4, 5)}
        pipe = deep_cache_pipe()
        torch._dynamo.reset()
        counters.clear()
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        first = generate(pipe, 4, **CACHE)  # steps: full, shallow, full, shallow
        after_first = graphs()
        second = generate(pipe, 5, **CACHE)
        third = generate(pipe, 4, **CACHE)
        yield dict(expected=expected, first=first, second=second, third=third, after_first=after_first,
                   after_all=graphs(), recompiles=counters["recompiles"].copy())
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


def test_compiled_close_to_eager(runs):
    np.testing.assert_allclose(runs["first"], runs["expected"][4], atol=2e-3, rtol=0)
    np.testing.assert_allclose(runs["second"], runs["expected"][5], atol=2e-3, rtol=0)
    np.testing.assert_array_equal(runs["third"], runs["first"])


def test_full_and_shallow_pass_compile_once(runs):
    assert runs["after_first"] == 2  # the full pass and the shallow pass
    assert runs["after_all"] == 2, f"recompiled: {dict(runs['recompiles'])}"


@pytest.fixture(scope="module")
def pass_graph_runs(runs):
    """The passes as ``cuda_graphs`` sets them up: each compiled explicitly inside a graph wrapper.

    On the CPU the wrapper runs them uncaptured; what this checks is that the explicitly compiled
    passes still compile once each, under a dispatcher and a wrapper that Dynamo skips, also when
    DeepCache was already set up before the UNet was marked.
    """
    from onediffx.cuda_graphs import mark_passes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = deep_cache_pipe()
        generate(pipe, 2, **CACHE)  # DeepCache set up before compiling, as the bench does
        torch._dynamo.reset()
        counters.clear()
        mark_passes(pipe.unet, {"backend": "inductor"})
        first = generate(pipe, 4, **CACHE)
        second = generate(pipe, 5, **CACHE)
        yield dict(first=first, second=second, graphs=graphs(), recompiles=counters["recompiles"].copy())
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


def test_explicitly_compiled_passes_compile_once_and_match_eager(runs, pass_graph_runs):
    np.testing.assert_allclose(pass_graph_runs["first"], runs["expected"][4], atol=2e-3, rtol=0)
    np.testing.assert_allclose(pass_graph_runs["second"], runs["expected"][5], atol=2e-3, rtol=0)
    assert pass_graph_runs["graphs"] == 2, f"recompiled: {dict(pass_graph_runs['recompiles'])}"


def test_ahead_of_time_regions_under_deep_cache(runs):
    """Replay hooks sit on blocks whose forward is a shared ahead-of-time region: still eager's image."""
    from onediffx.compile import compile_options, compile_pipe, compile_state
    from onediffx.deep_cache import DeepCacheParams, deep_cache

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch._dynamo.reset()
        pipe = tiny_sd()  # a plain diffusers pipeline, DeepCache applied by the context manager
        pipe.set_progress_bar_config(disable=True)
        compile_pipe(pipe, "inductor", compile_options("regional", graph="aot", components=["unet"]))
        with deep_cache(pipe, DeepCacheParams(**CACHE)):
            got = generate(pipe, 4)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert len(compile_state(pipe).saveable) > 1  # one entry per block structure
    np.testing.assert_allclose(got, runs["expected"][4], atol=2e-3, rtol=0)
