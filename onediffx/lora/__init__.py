"""Fast LoRA loading, fusing and switching, in place on the pipeline's own weights.

The API keeps OneDiffX's function signatures. Reading goes through ``sources`` (safetensors only),
key conversion through ``formats`` (diffusers' converters), checking through ``fit`` and the
in-place arithmetic through ``fuse``.
"""

from .api import (
    delete_adapters,
    load_and_fuse_lora,
    load_lora_and_optionally_fuse,
    set_and_fuse_adapters,
    unfuse_lora,
    update_graph_with_constant_folding_info,
)
from .errors import LoraError, LoraFormatError, LoraMismatchError, LoraNotFoundError
from .sources import clear_cache

__all__ = [
    "load_lora_and_optionally_fuse",
    "load_and_fuse_lora",
    "unfuse_lora",
    "set_and_fuse_adapters",
    "delete_adapters",
    "update_graph_with_constant_folding_info",
    "LoraError",
    "LoraFormatError",
    "LoraMismatchError",
    "LoraNotFoundError",
    "clear_cache",
]
