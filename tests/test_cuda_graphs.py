"""onediffx's CUDA graphs (``onediffx.cuda_graphs``): what the CPU can check.

Capture and replay need CUDA (``test_gpu.py`` checks them against the uncaptured compiled forward,
with LoRA fusing and resolution switches). Here: calls the wrapper cannot capture run as they are and
say so once, a pipeline on the CPU gets no graphs, and argument trees survive the static-buffer round
trip.
"""

from __future__ import annotations

import logging

import torch

from onediffx.compile import compile_options, compile_pipe, compile_state
from onediffx.cuda_graphs import CudaGraphs, _rebuild, _tensors
from onediffx.compile.dispatch import CompiledHook
from onediffx.models.tiny import tiny_sd
from onediffx.state import PASS_GRAPHS


def test_calls_off_cuda_run_uncaptured_and_say_so_once(caplog):
    calls = []

    def fn(x, *, scale):
        calls.append(scale)
        return {"y": x * scale}

    graphs = CudaGraphs(fn, torch.nn.Linear(2, 2), "toy")
    x = torch.ones(3)
    with caplog.at_level(logging.WARNING, logger="onediffx.compile.cuda_graphs"):
        outs = [graphs(x, scale=s) for s in (2.0, 2.0, 3.0)]
    assert [o["y"][0].item() for o in outs] == [2.0, 2.0, 3.0] and calls == [2.0, 2.0, 3.0]
    assert graphs.captures == 0 and len(graphs.graphs) == 2  # one uncaptured entry per signature
    assert sum("not using a CUDA graph" in r.message for r in caplog.records) == 1


def test_argument_trees_round_trip_through_static_buffers():
    args = (torch.zeros(2), 3, [torch.ones(1), None])
    kwargs = {"cond": {"a": torch.full((2,), 5.0)}, "flag": True}
    tensors = _tensors((args, kwargs), [])
    assert len(tensors) == 3
    new = [t + 1 for t in tensors]
    r_args, r_kwargs = _rebuild((args, kwargs), iter(new))
    assert r_args[1] == 3 and r_args[2][1] is None and r_kwargs["flag"] is True and isinstance(r_args[2], list)
    assert r_args[0] is new[0] and r_args[2][0] is new[1] and r_kwargs["cond"]["a"] is new[2]


def test_a_cpu_pipeline_gets_no_graphs():
    pipe = tiny_sd()
    compile_pipe(pipe, "inductor", compile_options("inductor", cuda_graphs=True))
    state = compile_state(pipe)
    assert state.graphed == {} and isinstance(pipe.unet.forward, CompiledHook)
    assert not PASS_GRAPHS.has(pipe.unet)


def test_signatures_past_the_cap_run_uncaptured(monkeypatch, caplog):
    """A value that changes at every call (a Python-number timestep) must not capture a graph per call."""
    from onediffx import cuda_graphs

    graphs = CudaGraphs(lambda x, t: x * t, torch.nn.Linear(2, 2), "toy")
    graphs.graphs.update({("captured", i): object() for i in range(cuda_graphs.MAX_GRAPHS)})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # pretend, to reach the cap check
    with caplog.at_level(logging.WARNING, logger="onediffx.compile.cuda_graphs"):
        results = [graphs(torch.ones(2), t).tolist() for t in (1.0, 2.0, 3.0)]
    assert results == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]] and graphs.captures == 0
    assert sum("signatures are captured already" in r.message for r in caplog.records) == 1


def test_in_place_weight_changes_keep_the_key_and_moves_change_it():
    """Graphs read parameters where they were captured: in place is fine, a move must re-capture."""
    module = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(20)])
    graphs = CudaGraphs(module, module, "toy")
    x = torch.ones(4)
    key = graphs._key((x,), {})
    module.load_state_dict({k: v + 1 for k, v in module.state_dict().items()})  # copies into the same storage
    assert graphs._key((x,), {}) == key
    module.to(torch.float64)
    moved = graphs._key((x,), {})
    assert moved != key
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # .to() then makes new Parameter objects
    try:
        module.to(torch.float32)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert graphs._key((x,), {}) not in (key, moved)
