"""Compile backends, registered by name: ``none``, ``inductor`` (and ``auto``, resolved per device).

A backend is ``fn(module, name, options, on_miss) -> handle``: it compiles ``module`` in place
(the object the pipeline holds stays the same) and returns a ``CompiledForward`` when the result
can be saved to the graph cache, or ``None`` when it relies on Inductor's own caches. Plugins
register more (``plugins/onediff.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from ..registry import register_backend
if TYPE_CHECKING:
    from .dispatch import CompiledForward


def inductor_options(options: Any) -> dict[str, Any]:
    """Inductor config for ``torch.compile(options=...)``: the mode's settings plus explicit flags.

    ``torch.compile`` refuses ``mode`` and ``options`` together, so a mode is expanded into the
    options it stands for.
    """
    opts: dict[str, Any] = {}
    if options.mode:
        opts.update(torch._inductor.list_mode_options(options.mode))
    if options.max_autotune:
        opts["max_autotune"] = True
    opts.update(dict(options.inductor or {}))
    return opts


def compile_kwargs(options: Any) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for Inductor with these options (``fullgraph`` apart)."""
    return dict(backend="inductor", dynamic=options.dynamic, options=inductor_options(options))


def aot_capable(module: nn.Module, options: Any) -> bool:
    """Whether the module can be compiled into saveable graphs (else Dynamo's usual path is used).

    Regional compilation and Inductor's own CUDA graphs (``mode=reduce-overhead``) have no
    saveable form here; DeepCache's step dispatcher (asked of the module's hook registry) is Python
    control flow that must stay outside the graph. A forward that something else installed on the
    instance (a diffusers hook, a user's wrapper) would be bypassed by graphs of the class's
    forward, so it keeps Dynamo's path too. (onediffx's ``cuda_graphs`` wrap saveable graphs instead.)
    """
    from diffusers.models.modeling_utils import ModelMixin

    if options.regional or inductor_options(options).get("triton.cudagraphs") or options.graph != "aot":
        return False
    from ..hooks import DEEP_CACHE_DISPATCH, has_hook

    if has_hook(module, DEEP_CACHE_DISPATCH) or "forward" in vars(module):
        return False
    return isinstance(module, ModelMixin) or type(module).__module__.startswith("diffusers.")


@register_backend("inductor")
def inductor(module: nn.Module, name: str, options: Any,
             on_miss: str = "compile") -> Union[CompiledForward, dict[str, CompiledForward], None]:
    """PyTorch Inductor via torch.compile; saveable ahead-of-time graphs where possible.

    Regional compilation returns the saveable graphs of each block structure by block path (see
    ``regions.py``); a component with no matching block is compiled whole.
    """
    # Imported here: listing the backends (``onediffx list``) should not import diffusers' hooks.
    from .dispatch import CompiledForward
    from .regions import compile_regions, compile_regions_aot, region_names

    kwargs = compile_kwargs(options)
    names = region_names(module, options.regions) if options.regional else []
    if names and options.graph == "aot" and not kwargs["options"].get("triton.cudagraphs"):
        handles = compile_regions_aot(module, names, kwargs, on_miss, name, options.attention)
        if handles:
            return handles
    elif names and compile_regions(module, names, kwargs, options.fullgraph):
        return None
    if aot_capable(module, options):
        compiled = CompiledForward(module, kwargs, on_miss=on_miss, name=name, attention=options.attention)
        compiled.install()
        return compiled
    module.compile(fullgraph=options.fullgraph, **kwargs)
    return None


@register_backend("none")
def eager(module: nn.Module, name: str, options: Any, on_miss: str = "compile") -> None:
    """No compilation: diffusers' eager modules."""
    return None


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` is Inductor on CUDA and eager on the CPU, where compiling rarely pays for itself."""
    if name == "auto":
        return "inductor" if device.type == "cuda" else "none"
    return name
