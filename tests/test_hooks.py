"""Forward changes as named hooks in diffusers' ``HookRegistry`` (``onediffx.hooks``).

Compiling, CUDA graphs and DeepCache each put one named hook on a module; they find each other
through the registry and come off by name, whatever sits above them. Checked against eager
outputs: a hook that is found but no longer runs, or runs where it should not, changes numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.hooks import ModelHook
from torch._dynamo.utils import counters

from onediffx.compile import compile_options, compile_pipe, compile_state
from onediffx.compile.backends import aot_capable
from onediffx.cuda_graphs import GraphedForward, graph_module
from onediffx.compile.dispatch import CompiledHook
from onediffx.compile.pipe import restore_eager
from onediffx.deep_cache import DeepCache, DeepCacheParams, deep_cache, disable_deep_cache, prepare
from onediffx.deep_cache.layout import replay_plan
from onediffx.hooks import (COMPILED, CUDA_GRAPHS, DEEP_CACHE_DISPATCH, DEEP_CACHE_REPLAY, ForwardHook, add_hook,
                            get_hook, has_hook, hook_registry, remove_hook)
from onediffx.models.tiny import tiny_sd
from onediffx.state import REGIONS

CACHE = dict(cache_interval=2, cache_layer_id=0, cache_block_id=1)
RESNET_CACHE = dict(cache_interval=2, cache_layer_id=0, cache_block_id=0)
"""A branch whose shallow passes replay single resnet blocks (tiny SD: ``down_blocks.0.resnets.1``, ...)."""


class Affine(ForwardHook):
    """``scale * (forward underneath) + shift``: stacking order shows in the numbers."""

    def __init__(self, module: torch.nn.Module, name: str, scale: float, shift: float) -> None:
        super().__init__(module)
        self.hook_name, self.scale, self.shift = name, scale, shift

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * self.scale + self.shift


class Negate(ModelHook):
    """A diffusers-style hook with its own ``new_forward`` (as DeepCache's replay hook has)."""

    def new_forward(self, module, *args, **kwargs):
        return -self.fn_ref.original_forward(*args, **kwargs)


def _images(pipe, steps: int = 4, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt="a red cube", num_inference_steps=steps, height=64, width=64, generator=generator,
                output_type="np", **kwargs).images


def _unet_call(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text, return_dict=False)[0]


def _our_hooks(component: torch.nn.Module) -> list[tuple[str, str]]:
    return [(path, name) for path, m in component.named_modules() if (r := hook_registry(m)) is not None
            for name in r.hooks if name.startswith("onediffx_") and name != DEEP_CACHE_REPLAY]


# -- the helpers ---------------------------------------------------------------------------------


def test_hooks_stack_in_order_and_come_off_by_name_from_anywhere():
    linear = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    eager = linear(x).detach()
    add_hook(linear, Affine(linear, "inner", 2.0, 0.0))
    add_hook(linear, Negate(), "negate")  # registry-wrapped, with its own new_forward
    add_hook(linear, Affine(linear, "outer", 1.0, 5.0))
    assert list(hook_registry(linear).hooks) == ["inner", "negate", "outer"]
    assert linear.forward is get_hook(linear, "outer")  # our hooks are the forward itself, no wrapper frames
    torch.testing.assert_close(linear(x), -(eager * 2.0) + 5.0)
    # diffusers' remove_hook on "inner" would skip Negate's new_forward; ours keeps every hook above
    assert remove_hook(linear, "inner") and not has_hook(linear, "inner")
    assert list(hook_registry(linear).hooks) == ["negate", "outer"]
    torch.testing.assert_close(linear(x), -eager + 5.0)
    assert remove_hook(linear, "negate")
    torch.testing.assert_close(linear(x), eager + 5.0)
    assert not remove_hook(linear, "negate")
    assert remove_hook(linear, "outer")
    assert "forward" not in vars(linear)  # the class's forward again, nothing pinned on the instance
    torch.testing.assert_close(linear(x), eager)


# -- compile -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_unet_is_a_named_hook_and_restore_eager_removes_it():
    """cuda_graphs on the CPU: no graphs, the compiled hook alone, matching eager, removed exactly."""
    pipe = tiny_sd()
    eager = _unet_call(pipe.unet)
    compile_pipe(pipe, "inductor", compile_options("inductor", components=["unet"], cuda_graphs=True,
                                                   channels_last=False, fuse_qkv=False))
    hook = get_hook(pipe.unet, COMPILED)
    assert isinstance(hook, CompiledHook) and pipe.unet.forward is hook
    assert hook.compiled is compile_state(pipe).saveable["unet"]
    assert _our_hooks(pipe.unet) == [("", COMPILED)] and compile_state(pipe).graphed == {}
    torch._dynamo.reset()
    try:
        compiled = _unet_call(pipe.unet)
    finally:
        torch._dynamo.reset()
    assert hook.compiled.compiles == 1
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert restore_eager(pipe) == 1 and compile_state(pipe) is None
    assert _our_hooks(pipe.unet) == [] and "forward" not in vars(pipe.unet)
    torch.testing.assert_close(_unet_call(pipe.unet), eager, atol=0, rtol=0)


def test_cuda_graphs_wrap_the_compiled_hook_and_capture_through_it(monkeypatch):
    """On the CPU the graphs run uncaptured, which still shows what a capture would run: the compiled hook."""
    pipe = tiny_sd()
    eager = _unet_call(pipe.unet)
    compile_pipe(pipe, "inductor", compile_options("inductor", components=["unet"], channels_last=False,
                                                   fuse_qkv=False))
    compiled = get_hook(pipe.unet, COMPILED).compiled
    calls = []

    def spy(module, args, kwargs):  # the compiled graphs' place, without paying for Inductor here
        calls.append(module)
        return type(module).forward(module, *args, **kwargs)

    monkeypatch.setattr(compiled, "call", spy)
    graphed = graph_module(pipe.unet, "unet")
    assert list(hook_registry(pipe.unet).hooks) == [COMPILED, CUDA_GRAPHS] and pipe.unet.forward is graphed
    torch.testing.assert_close(_unet_call(pipe.unet), eager, atol=0, rtol=0)
    assert calls == [pipe.unet]  # the graphs' forward is the compiled hook underneath
    calls.clear()
    pipe.unet.forward = graphed.fn  # what test_gpu's uncaptured reference does: the forward under the graphs
    try:
        torch.testing.assert_close(_unet_call(pipe.unet), eager, atol=0, rtol=0)
    finally:
        pipe.unet.forward = graphed
    assert calls == [pipe.unet]
    assert restore_eager(pipe) == 2 and _our_hooks(pipe.unet) == []  # graphs, then the compiled hook
    assert "forward" not in vars(pipe.unet)


def test_regions_come_off_from_under_deep_cache_replay_hooks():
    """Ahead-of-time regions with DeepCache's replay hooks registered above some of them: recompiling
    (``restore_eager``) removes every region hook and leaves the replay hooks working."""
    pipe = tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    with deep_cache(pipe, DeepCacheParams(**RESNET_CACHE)):
        expected = _images(pipe)
    disable_deep_cache(pipe)
    assert _our_hooks(pipe.unet) == [] and "forward" not in vars(pipe.unet)

    compile_pipe(pipe, "inductor", compile_options("regional", graph="aot", components=["unet"], channels_last=False,
                                                   fuse_qkv=False))
    regions = [path for path, name in _our_hooks(pipe.unet) if name == COMPILED]
    assert len(regions) == REGIONS.get(pipe.unet) > 1
    prepare(pipe, DeepCacheParams(**RESNET_CACHE))
    both = [m for m in pipe.unet.modules() if has_hook(m, COMPILED) and has_hook(m, DEEP_CACHE_REPLAY)]
    assert both, "the check needs a replayed module that is also a region block"
    assert all(list(hook_registry(m).hooks) == [COMPILED, DEEP_CACHE_REPLAY] for m in both)
    assert restore_eager(pipe) == len(regions)
    assert _our_hooks(pipe.unet) == [("", DEEP_CACHE_DISPATCH)]
    assert all(list(hook_registry(m).hooks) == [DEEP_CACHE_REPLAY] for m in both)
    state = DeepCache.of(pipe.unet)
    recorded, full_pass = [], state.full_pass

    def spy(args, kwargs):  # replayed outputs equal recomputed ones here: what shows a skipped hook is its tape
        out, features = full_pass(args, kwargs)
        recorded.append(sorted(features))
        return out, features

    state.full_pass = spy
    with deep_cache(pipe, DeepCacheParams(**RESNET_CACHE)):
        got = _images(pipe)
    np.testing.assert_array_equal(got, expected)
    plan = sorted(name for name, _ in replay_plan(pipe.unet, state.skip_index))
    assert recorded == [plan, plan]  # steps 0 and 2: every replay hook ran, those above the regions too


# -- DeepCache and compile -----------------------------------------------------------------------


def test_compile_asks_the_registry_whether_deep_cache_is_on():
    pipe = tiny_sd()
    options = compile_options("inductor", components=["unet"], channels_last=False, fuse_qkv=False)
    state = prepare(pipe, DeepCacheParams(**CACHE))
    assert get_hook(pipe.unet, DEEP_CACHE_DISPATCH) is state is DeepCache.of(pipe.unet)
    assert not aot_capable(pipe.unet, options)
    compile_pipe(pipe, "inductor", options)
    assert compile_state(pipe).dynamo == ["unet"] and compile_state(pipe).saveable == {}
    assert not has_hook(pipe.unet, COMPILED) and pipe.unet.forward is state
    assert pipe.unet._compiled_call_impl is not None

    disable_deep_cache(pipe)
    assert not has_hook(pipe.unet, DEEP_CACHE_DISPATCH) and DeepCache.of(pipe.unet) is not state
    assert aot_capable(pipe.unet, options)
    compile_pipe(pipe, "inductor", options)  # DeepCache off: saveable graphs again
    assert list(compile_state(pipe).saveable) == ["unet"] and has_hook(pipe.unet, COMPILED)
    assert pipe.unet._compiled_call_impl is None


def test_deep_cache_releases_compiles_hooks_outermost_first():
    """DeepCache after compiling: the graphs come off (CUDA graphs, then the compiled forward, handed
    to Dynamo's ``module.compile``) and the state says so; detaching leaves the UNet plain."""
    pipe = tiny_sd()
    compile_pipe(pipe, "inductor", compile_options("inductor", components=["unet"], channels_last=False,
                                                   fuse_qkv=False))
    state = compile_state(pipe)
    graphed = state.graphed["unet"] = graph_module(pipe.unet, "unet")  # what a CUDA device would have
    released = []
    graphed.on_release = lambda: released.append(CUDA_GRAPHS) or state.graphed.pop("unet")
    state.saveable["unet"].on_release = lambda h, inner=state.saveable["unet"].on_release: (
        released.append(COMPILED), inner(h))
    deep = prepare(pipe, DeepCacheParams(**CACHE))
    assert released == [CUDA_GRAPHS, COMPILED]
    assert list(hook_registry(pipe.unet).hooks) == [DEEP_CACHE_DISPATCH] and pipe.unet.forward is deep
    assert state.saveable == {} and state.dynamo == ["unet"] and state.graphed == {}
    assert pipe.unet._compiled_call_impl is not None
    assert deep.inner == type(pipe.unet).forward.__get__(pipe.unet)  # the class's forward underneath
    disable_deep_cache(pipe)
    assert _our_hooks(pipe.unet) == [] and "forward" not in vars(pipe.unet)
    assert not any(has_hook(m, DEEP_CACHE_REPLAY) for m in pipe.unet.modules())
    assert isinstance(graphed, GraphedForward)


@pytest.mark.slow
def test_released_graphs_under_deep_cache_match_eager_deep_cache():
    """The release path end to end: compiled ahead of time, then DeepCache; Dynamo compiles the two
    passes under the dispatcher hook (``fullgraph``), and the images are eager DeepCache's."""
    eager = tiny_sd()
    eager.set_progress_bar_config(disable=True)
    with deep_cache(eager, DeepCacheParams(**CACHE)):
        expected = _images(eager)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    try:
        pipe = tiny_sd()
        pipe.set_progress_bar_config(disable=True)
        compile_pipe(pipe, "inductor", compile_options("inductor", components=["unet"]))
        with deep_cache(pipe, DeepCacheParams(**CACHE)):
            got = _images(pipe)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert compile_state(pipe).dynamo == ["unet"] and not has_hook(pipe.unet, COMPILED)
    assert graphs == 2  # the full and the shallow pass, the dispatcher left out
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)
