"""Built-in stages; importing this package registers them."""

from . import compile, deepcache, graph_cache, lora_fuse, warmup  # noqa: F401
from .base import Assembly, Stage

__all__ = ["Assembly", "Stage"]
