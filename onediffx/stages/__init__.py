"""Built-in stages; importing this package registers them.

Stage modules import torch and diffusers inside ``check``/``apply``, not at the top, so building the
registry (``onediffx list``, config checks) stays cheap.
"""

from . import compile, deepcache, graph_cache, lora_fuse, parallel, quantize, stepcache, warmup  # noqa: F401
from .base import Assembly, Stage

__all__ = ["Assembly", "Stage"]
