"""Regional compilation: blocks compiled one by one, one set of graphs per block structure.

The SDXL UNet and VAE decoder hold 101 transformer and resnet blocks of 22 distinct shapes.
Compiling 22 small graphs instead of two large ones is what cuts the cold start (H100: 41 s to the
first image against 116 s); the glue between blocks runs eagerly, and a CUDA graph over the whole
component (``cuda_graphs``) removes its launch cost.

Two ways to compile the regions, as for whole components (``compile.graph``):

* ``dynamo``: ``block.compile()`` on each block. Dynamo files compiled code under the forward's
  code object and, with inlined module parameters, does not pin one instance, so every block of a
  class shares the graph compiled for its shapes. Restarts re-trace from Inductor's caches.
* ``aot``: blocks are grouped by ``structure_digest``; each group shares one ``CompiledForward``
  (ahead-of-time graphs that take the block as an argument and read its parameters at each call),
  saved and loaded by the graph cache like a whole component, so restarts trace nothing. Each
  block's forward is a ``CompiledHook`` named ``hooks.COMPILED`` in its ``HookRegistry``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from .dispatch import CompiledForward
from ..state import REGIONS

_SCALARS = (bool, int, float, str, type(None))

REPEATED = "repeated"
"""In ``compile.regions``: the component's own repeated blocks (``repeated_blocks``)."""

REPEATED_BLOCKS = {"SD3Transformer2DModel": ["JointTransformerBlock"]}
"""Repeated blocks of denoisers whose diffusers class declares no ``_repeated_blocks``."""


def repeated_blocks(module: nn.Module) -> list[str]:
    """The block classes diffusers' ``compile_repeated_blocks`` would compile in ``module`` (its
    ``_repeated_blocks``: FLUX's double- and single-stream blocks, the UNet's transformer blocks)."""
    return list(getattr(module, "_repeated_blocks", None) or REPEATED_BLOCKS.get(type(module).__name__, []))


def region_names(module: nn.Module, names: list[str]) -> list[str]:
    """The block classes compiled one by one in ``module``: ``names``, with ``repeated`` standing for
    the module's repeated blocks; no names at all means those repeated blocks alone.

    One preset (``[repeated, ResnetBlock2D]``) so serves a UNet (its transformer blocks), FLUX and SD3
    (their transformer blocks) and every VAE decoder (its resnet blocks) alike.
    """
    out: list[str] = []
    for name in names or [REPEATED]:
        for block in repeated_blocks(module) if name == REPEATED else [name]:
            if block not in out:
                out.append(block)
    return out


def region_paths(module: nn.Module, names: list[str]) -> list[str]:
    """Paths of the submodules whose class is named in ``names``; a match inside a match is skipped."""
    found: list[str] = []
    for path, sub in module.named_modules():
        if path and type(sub).__name__ in names and not any(path.startswith(p + ".") for p in found):
            found.append(path)
    return found


def _raise_recompile_limit() -> None:
    # Every shape of a block class counts against Dynamo's per-code-object limit (8 by default).
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)


def compile_regions(module: nn.Module, names: list[str], kwargs: dict[str, Any], fullgraph: bool = True) -> int:
    """Dynamo's path: ``compile()`` each matching block; returns how many."""
    paths = region_paths(module, names)
    if paths:
        _raise_recompile_limit()
    for path in paths:
        module.get_submodule(path).compile(fullgraph=fullgraph, **kwargs)
    if paths:
        REGIONS.set(module, len(paths))
    return len(paths)


def structure_digest(block: nn.Module) -> str:
    """What two blocks must share to share compiled graphs.

    A graph bakes in every class, parameter shape, dtype and layout, and every scalar attribute
    (head counts, scales, flags, which attention processor): all of them, for the block and each
    of its submodules, go into the digest.
    """
    h = hashlib.sha256()
    for name, sub in block.named_modules():
        h.update(f"|{name}:{type(sub).__module__}.{type(sub).__qualname__}:{sub.training}".encode())
        for key, value in sorted(vars(sub).items()):
            if key.startswith("_") or key == "training" or isinstance(value, (nn.Module, torch.Tensor)):
                continue
            text = repr(value) if isinstance(value, _SCALARS) or (
                isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value)) else type(value).__qualname__
            h.update(f";{key}={text}".encode())
        for key, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            h.update(f";{key}{tuple(tensor.shape)}{tuple(tensor.stride())}{tensor.dtype}{tensor.device}".encode())
    return h.hexdigest()[:16]


def compile_regions_aot(module: nn.Module, names: list[str], kwargs: dict[str, Any], on_miss: str,
                        prefix: str, attention: str = "default") -> dict[str, CompiledForward]:
    """Ahead-of-time path: one ``CompiledForward`` per structure group, by its first block's path."""
    groups: dict[str, CompiledForward] = {}
    handles: dict[str, CompiledForward] = {}
    paths = region_paths(module, names)
    for path in paths:
        block = module.get_submodule(path)
        digest = structure_digest(block)
        shared = groups.get(digest)
        if shared is None:
            shared = groups[digest] = handles[path] = CompiledForward(block, kwargs, on_miss=on_miss, name=f"{prefix}.{path}",
                                                                    attention=attention)
            shared.digest = digest
        shared.install(block)  # the graphs of its structure group, called with this block
    if paths:
        REGIONS.set(module, len(paths))
    return handles
