"""State a capability leaves on a pipeline, module or function, in one registry of named slots.

Compiling, LoRA, quantizing and DeepCache each remember what they did to a pipeline (to undo it, to
key the graph cache, to let another capability refuse or adapt). Each keeps it in a named, typed
slot of one registry on the object (``obj.__dict__["_onediffx_state"]``), as forward changes are
named hooks in diffusers' ``HookRegistry`` (``hooks``): one capability reads another's state by the
slot's name (``LORA.get(pipe)``) without importing it, and nothing is hidden in an ad-hoc private
attribute that only a grep finds.

A slot's value may contribute its part of a graph-cache key: a value with a
``cache_key(component) -> dict | None`` method is asked by ``cache_key_parts``, so the graph cache's
key covers quantized weights (and whatever comes next) without the compile code importing the
capability that made them.

The registry is reached through the instance ``__dict__``, never ``getattr``: diffusers' pipelines
and ``nn.Module`` resolve unknown attributes through their own ``__getattr__``, and a slot must
never be mistaken for a config entry, a submodule or a class attribute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, Optional, TypeVar

if TYPE_CHECKING:
    import torch

    from .compile.pipe import CompileState
    from .deep_cache.config import DeepCacheParams
    from .lora.fuse import LoraState
    from .quantize.pipe import QuantizeState
    from .step_cache.config import StepCacheConfig

T = TypeVar("T")

ATTR = "_onediffx_state"
"""The one attribute (in the instance ``__dict__``) that holds an object's slots."""


def slots_of(owner: Any, create: bool = False) -> Optional[dict[str, Any]]:
    """The slot values on ``owner`` by slot name (made empty when ``create``), or ``None``."""
    attributes = getattr(owner, "__dict__", None)  # a bound method has none: it holds no slots
    found = None if attributes is None else attributes.get(ATTR)
    if found is None and create:
        found = attributes[ATTR] = {}
    return found


class Slot(Generic[T]):
    """One named place for one capability's state; ``get``/``set``/``clear`` on any object."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.__doc__ = doc

    def get(self, owner: Any, default: Optional[T] = None) -> Optional[T]:
        """The value on ``owner``, or ``default`` when the slot is empty."""
        found = slots_of(owner)
        return default if found is None else found.get(self.name, default)

    def has(self, owner: Any) -> bool:
        """Whether the slot is set on ``owner`` (a slot may hold ``None`` on purpose)."""
        found = slots_of(owner)
        return found is not None and self.name in found

    def set(self, owner: Any, value: T) -> T:
        """Put ``value`` in the slot on ``owner`` and return it."""
        slots_of(owner, create=True)[self.name] = value
        return value

    def clear(self, owner: Any) -> Optional[T]:
        """Empty the slot on ``owner``; return what it held."""
        found = slots_of(owner)
        return None if found is None else found.pop(self.name, None)

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"


def cache_key_parts(owner: Any, component: str) -> dict[str, Any]:
    """What the slots on ``owner`` add to the graph-cache key of ``component``, by slot name.

    A slot takes part when its value has a ``cache_key(component)`` method that returns a dict
    (``None``: nothing about this component, as an unquantized VAE under a quantized UNet).
    """
    parts = {}
    for name, value in (slots_of(owner) or {}).items():
        key = getattr(value, "cache_key", None)
        part = key(component) if callable(key) else None
        if part is not None:
            parts[name] = part
    return parts


# -- the slots, by capability ------------------------------------------------------------------

# On a pipeline
COMPILE: Slot[CompileState] = Slot("compile", "What ``compile_pipe`` did: backend, options, compiled and graphed components.")
LORA: Slot[LoraState] = Slot("lora", "The LoRA engine's loaded adapters, what is fused now and the kept originals ``W0``.")
QUANTIZE: Slot[QuantizeState] = Slot("quantize", "What ``quantize_pipe`` did; adds the quantized layers to the graph-cache key.")
DEEP_CACHE: Slot[DeepCacheParams] = Slot("deep_cache", "DeepCache's settings for calls that pass no cache arguments (``deep_cache.enable``).")
STEP_CACHE: Slot[StepCacheConfig] = Slot("step_cache", "The diffusers step cache enabled on the transformer (``step_cache.enable``).")
EXECUTION_DEVICE: Slot[torch.device] = Slot("execution_device", "The device a compiled pipeline's calls run on, pinned (``compile.execution_device``).")

# On a module
REGIONS: Slot[int] = Slot("regions", "How many blocks of this module run regionally compiled graphs.")
PASS_GRAPHS: Slot[Optional[dict]] = Slot(
    "pass_graphs", "DeepCache captures its passes in CUDA graphs; the value is the passes' compile kwargs (``None``: eager).")
FILLS_FUSED: Slot[bool] = Slot("fills_fused", "This attention's separate q/k/v projections are rows of its fused copy.")
IP_ADAPTER_SCALE: Slot[float] = Slot("ip_adapter_scale", "The IP-Adapter scale InstantID folded into this UNet's weights.")
IP_ORIGINALS: Slot[dict] = Slot("ip_originals", "An IP-Adapter processor's value weights before a scale was folded in, by index.")

# On a function
ON_DEVICE: Slot[bool] = Slot("on_device", "This image postprocess already converts to PIL on the device.")
CLEANS_UP: Slot[bool] = Slot("cleans_up", "This replacement of Dynamo's guard helper is onediffx's own.")
