"""A hashable summary of a call's arguments, what graphs of one call signature are filed under.

Compiled graphs (``compile.guards``) and captured CUDA graphs (``cuda_graphs``) both serve a call
only when its arguments match the ones they were made for: they describe a call the same way.
"""

from __future__ import annotations

from typing import Any

import torch


def describe(value: Any) -> Any:
    """A hashable summary of a call's arguments: tensor metadata, other values as they are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device, value.requires_grad)
    if isinstance(value, dict):
        return ("dict", tuple((k, describe(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(describe(v) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ("object", type(value).__qualname__)
