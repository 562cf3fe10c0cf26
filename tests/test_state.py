"""The pipeline-state registry (``onediffx.state``): named slots that capabilities set, read and clear.

Each capability's state sits in its slot of one registry on the object (nothing else is left on the
pipeline), is emptied by the call that undoes the capability, and adds its part to the graph
cache's key through the registry, not through an import of the capability.
"""

from __future__ import annotations

import torch

from onediffx import state
from onediffx.models.tiny import tiny_sd


class Owner:
    """Any object with a ``__dict__`` can hold slots."""


class Keyed:
    def __init__(self, part):
        self.part = part

    def cache_key(self, component: str):
        return None if component == "vae" else {"component": component, **self.part}


def test_a_slot_is_set_read_and_cleared_on_its_owner_only():
    a, b = Owner(), Owner()
    assert state.COMPILE.get(a) is None and not state.COMPILE.has(a)
    assert state.COMPILE.set(a, "compiled") == "compiled"
    assert (state.COMPILE.get(a), state.COMPILE.get(b), state.LORA.get(a)) == ("compiled", None, None)
    assert vars(a) == {state.ATTR: {"compile": "compiled"}}  # one attribute holds every slot
    assert state.COMPILE.clear(a) == "compiled"
    assert (state.COMPILE.get(a), state.COMPILE.has(a), state.COMPILE.clear(a)) == (None, False, None)


def test_a_slot_may_hold_none_on_purpose_and_a_bound_method_holds_none():
    module = torch.nn.Linear(2, 2)
    state.PASS_GRAPHS.set(module, None)  # "capture the passes, uncompiled"
    assert state.PASS_GRAPHS.has(module) and state.PASS_GRAPHS.get(module, "unset") is None
    assert state.ON_DEVICE.get(module.forward, False) is False  # a bound method has no __dict__


def test_each_slot_value_adds_its_own_part_to_the_cache_key():
    pipe = Owner()
    state.QUANTIZE.set(pipe, Keyed({"mode": "int8"}))
    state.COMPILE.set(pipe, "no cache_key method: no part")
    assert state.cache_key_parts(pipe, "unet") == {"quantize": {"component": "unet", "mode": "int8"}}
    assert state.cache_key_parts(pipe, "vae") == {}
    assert state.cache_key_parts(Owner(), "unet") == {}


def test_compile_state_is_in_its_slot_and_restore_eager_clears_it():
    from onediffx.compile import compile_pipe, compile_state
    from onediffx.compile.pipe import restore_eager

    pipe = tiny_sd()
    compile_pipe(pipe, backend="none")
    held = state.COMPILE.get(pipe)
    assert held is compile_state(pipe) and held.backend == "none"
    assert [name for name in vars(pipe) if name.startswith("_onediffx")] == [state.ATTR]
    restore_eager(pipe)
    assert state.COMPILE.get(pipe) is None and compile_state(pipe) is None


def test_lora_state_is_in_its_slot_and_unfuse_empties_what_is_fused():
    from onediffx.lora import load_and_fuse_lora, unfuse_lora
    from onediffx.lora.synthetic import kohya_state_dict, lora_targets, random_lora

    pipe = tiny_sd()
    before = pipe.unet.conv_in.weight.detach().clone()
    layers = random_lora(lora_targets(pipe, ("unet",)), 4, seed=1)
    load_and_fuse_lora(pipe, kohya_state_dict(layers), adapter_name="one")
    held = state.LORA.get(pipe)
    assert list(held.active) == ["one"] and len(held.fused) > 0
    unfuse_lora(pipe)
    assert state.LORA.get(pipe) is held and held.active == {} and held.fused == set()
    assert torch.equal(pipe.unet.conv_in.weight, before)


def test_quantize_state_keys_the_graph_cache_through_the_registry():
    from onediffx.compile.config import CompileConfig
    from onediffx.compile.pipe import CompileState, component_key
    from onediffx.quantize import quantize_pipe, quantize_state

    pipe = quantize_pipe(tiny_sd(), "int8_weight_only", components=["unet"])
    held = quantize_state(pipe)
    assert state.QUANTIZE.get(pipe) is held and held.layers
    compiled = CompileState("inductor", CompileConfig(backend="inductor"))
    unet, vae = component_key(pipe, "unet", compiled), component_key(pipe, "vae", compiled)
    assert unet["quantize"] == held.cache_key("unet")
    assert unet["quantize"]["mode"] == "int8_weight_only" and unet["quantize"]["count"] == len(held.layers)
    assert "quantize" not in vae
