"""Which Dynamo guards a saved graph keeps.

A graph that is saved and loaded in another process can only carry guards that serialize: tensor
metadata (shape, dtype, device, strides), global state (grad mode, autocast) and the shape
environment. Guards on object identity (``ID_MATCH``, ``NN_MODULE``, closures) name objects of the
process that compiled and cannot travel. What is lost is protection against someone swapping a
submodule for another class after compiling; what is kept is exactly what tells one resolution or
dtype from another, which is what dispatch among prepared shapes needs.
"""

from __future__ import annotations

from typing import Sequence

import torch

GLOBAL_KINDS = ("GLOBAL_STATE", "SHAPE_ENV")


def _unserializable() -> frozenset[str]:
    manager = torch._dynamo.guards.CheckFunctionManager
    return frozenset(getattr(manager, "UNSUPPORTED_SERIALIZATION_GUARD_TYPES", ()))


def portable_guards(entries: Sequence) -> list[bool]:
    """``guard_filter_fn`` for ``torch.compile``: keep the guards a saved graph can carry."""
    unsupported = _unserializable()
    keep = []
    for entry in entries:
        kinds = {entry.guard_type, *(getattr(entry.orig_guard, "guard_types", None) or ())}
        if kinds & unsupported or getattr(entry.orig_guard, "_unserializable", False):
            keep.append(False)
        else:
            keep.append(not entry.is_global or entry.guard_type in GLOBAL_KINDS)
    return keep
