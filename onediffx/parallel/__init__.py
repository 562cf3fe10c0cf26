"""Past one GPU: a request's classifier-free guidance split over two processes (``parallel=cfg``).

Attributes load on first use, so the config schema can use ``ParallelConfig`` without importing torch.
"""

from ..lazy_exports import lazy_getattr

_EXPORTS = {"ParallelConfig": "config", "ParallelKind": "config", "CfgSplit": "cfg_split", "split_guidance": "cfg_split"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
