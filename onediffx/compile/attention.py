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
from torch._inductor.custom_graph_pass import CustomGraphPass

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


class AttentionSalt(CustomGraphPass):
    """A post-grad pass that changes nothing and names the attention priority in its ``uuid``.

    AOTAutograd's and Inductor's on-disk caches key an entry by the Dynamo graph and Inductor's
    config, and the Dynamo graph is the same whichever kernel the priority picks: without this, a
    graph traced under another priority (or by plain ``torch.compile`` with the same cache folder)
    would come back from them. A custom pass's ``uuid`` is part of both keys. Turning the
    AOTAutograd cache off instead also loses what ``save_pipe``
    serializes: on CUDA every save then failed.
    """

    def __init__(self, order: str) -> None:
        self.order = order

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> tuple[str, str]:
        return ("onediffx.compile.attention", self.order)


@contextlib.contextmanager
def attention_priority(choice: str, device: torch.device) -> Iterator[str]:
    """Trace under this attention-kernel priority (PyTorch's own order on the CPU or for ``default``),
    with the caches keyed by it (``AttentionSalt``). A post-grad pass the user set is kept, and then
    nothing salts the keys."""
    import torch._inductor.config as inductor_config

    resolved = resolve_attention(choice, device)
    with contextlib.ExitStack() as stack:
        if inductor_config.post_grad_custom_post_pass is None:
            stack.enter_context(inductor_config.patch(post_grad_custom_post_pass=AttentionSalt(resolved)))
        if resolved in ORDERS and device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([getattr(SDPBackend, n) for n in ORDERS[resolved]], set_priority=True))
        yield resolved
