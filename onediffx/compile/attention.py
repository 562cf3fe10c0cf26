"""Which fused attention kernel compiled graphs call (``compile.attention``).

PyTorch picks the kernel behind ``scaled_dot_product_attention`` when a graph is traced, and the
compiled graph keeps that choice. On Hopper, cuDNN's fused attention is faster than the
FlashAttention-2 kernel PyTorch prefers by default at SDXL's shapes (64-wide heads over 1024 and
4096 tokens); ``bench``'s ``attention`` rows measure it. The order is a priority, not an exclusive
choice: a shape the first kernel cannot take falls through to the next.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

ORDERS = {
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"),
}


def resolve_attention(choice: str, device: torch.device) -> str:
    """``auto``: cuDNN on CUDA devices of compute capability 9.0 and newer, PyTorch's order elsewhere."""
    choice = getattr(choice, "value", choice) or "default"
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        return "cudnn"
    return "default"


@contextlib.contextmanager
def attention_priority(choice: str, device: torch.device) -> Iterator[str]:
    """Trace under this attention-kernel priority (nothing changes on the CPU or for ``default``).

    AOTAutograd's on-disk cache keys an entry by the Dynamo graph, which is the same whichever
    kernel the priority picks: a graph traced under another priority (or by plain ``torch.compile``
    in the same cache folder) would come back from it. Tracing under a priority bypasses that cache;
    Inductor's own cache keys the traced graph, which names the kernel, and stays on.
    """
    resolved = resolve_attention(choice, device)
    if resolved not in ORDERS or device.type != "cuda":
        yield resolved
        return
    import torch._functorch.config as functorch_config
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with functorch_config.patch(enable_autograd_cache=False), \
            sdpa_kernel([getattr(SDPBackend, name) for name in ORDERS[resolved]], set_priority=True):
        yield resolved
