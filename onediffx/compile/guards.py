"""Which Dynamo guards a saved graph keeps, and the key that picks a graph for a call.

A graph saved and loaded in another process can only carry guards that serialize. Dynamo also
guards the module itself: its config attributes, its submodule dicts and their key order. Keeping
any of those makes Dynamo pickle the whole module tree into the saved guard state (for the SDXL
UNet: half of a 7 MB artifact, and 1-2 s of unpickling and guard building at each restart).

onediffx keeps only the portable guards (global state such as grad mode and autocast, and
tensor metadata of the call's inputs) and replaces the module guards by checks it can make
cheaply itself: the graph cache key holds the component's architecture and dtype, and
``dispatch_key`` below holds the inputs' exact metadata, the non-tensor arguments, and the
module's parameter dtype, device and mode. Inductor's compiled code also asserts the size and
stride of every parameter it reads. What is lost is protection against replacing a submodule
or attention processor after compiling, which an ahead-of-time graph could not see anyway.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..call_signature import describe

PORTABLE_GLOBAL = ("GLOBAL_STATE", "SHAPE_ENV")
MODULE_ARG = "self"
"""The local name of the module in the compiled function ``forward(self, ...)``."""


def _on_module(name: str) -> bool:
    head = name.replace("(", " ").replace(")", " ").replace("[", " ").replace(".", " ").split()
    return MODULE_ARG in head


def portable_guards(entries: Sequence) -> list[bool]:
    """``guard_filter_fn`` for ``torch.compile``: global state, and tensor metadata of the inputs."""
    return [entry.guard_type in PORTABLE_GLOBAL
            or (entry.guard_type == "TENSOR_MATCH" and not entry.is_global and not _on_module(entry.name))
            for entry in entries]


def dispatch_key(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What must be equal for a compiled graph to serve a call: a hashable summary of the call.

    Non-tensor arguments count by value (``return_dict=False`` and ``True`` are different
    graphs), tensors by shape, strides, dtype and device; the module by the dtype, device and
    layout of its first parameter and by train/eval mode.
    """
    param = next(module.parameters(), None)
    owner = None if param is None else (param.dtype, param.device, tuple(param.stride()))
    return (owner, module.training, describe(args), describe(kwargs))
