"""Past one GPU: a request's classifier-free guidance split over two processes (``parallel=cfg``)."""

from .cfg_split import CfgSplit, split_guidance
from .config import ParallelConfig, ParallelKind

__all__ = ["CfgSplit", "ParallelConfig", "ParallelKind", "split_guidance"]
