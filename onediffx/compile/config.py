"""``CompileConfig``: how ``compile_pipe`` compiles, for the Python API and the ``compile`` config group.

The ``compile`` group's schema is this dataclass (``onediffx.config.schema`` composes it into the
run config), so a preset file, a command-line override and ``compile_options(...)`` are checked
by the same types; closed sets of values are Enums, which Hydra checks at composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from ..errors import ConfigError


class Graph(str, Enum):
    """How whole components are compiled (``compile.graph``)."""

    aot = "aot"
    """Graphs captured ahead of time, saved and loaded by the graph cache without re-tracing."""
    dynamo = "dynamo"
    """torch.compile's usual lazy path (the graph cache then keeps Inductor's artifacts)."""


class VaeDtype(str, Enum):
    """The dtype the VAE runs in on CUDA (``compile.vae_dtype``)."""

    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class OnMiss(str, Enum):
    """What a call does whose input shape has no compiled graph (``warmup.unprepared``)."""

    compile = "compile"
    """Compile one more graph for it."""
    eager = "eager"
    """Run eagerly (once something is compiled), so an unexpected shape never stalls a service."""


class Attention(str, Enum):
    """The fused attention kernel compiled graphs call first (``compile.attention``)."""

    auto = "auto"
    """cuDNN's on CUDA GPUs of compute capability 9.0 and newer (Hopper), PyTorch's order elsewhere."""
    cudnn = "cudnn"
    flash = "flash"
    default = "default"
    """PyTorch's own order (FlashAttention-2 first on CUDA)."""


@dataclass
class CompileConfig:
    """How the heavy components are compiled (``compile=none|inductor|inductor_max|regional|auto``)."""

    backend: str = "none"
    mode: Optional[str] = None
    fullgraph: bool = True
    dynamic: Optional[bool] = False
    regional: bool = False
    regions: List[str] = field(default_factory=list)
    """With ``regional``: class names of the blocks compiled one by one (shared by all blocks of a
    shape), e.g. ``[BasicTransformerBlock, ResnetBlock2D]``; ``repeated`` stands for each component's
    repeated blocks (diffusers' ``_repeated_blocks``: a UNet's transformer blocks, FLUX's and SD3's
    transformer blocks); empty: ``[repeated]``."""
    channels_last: bool = True
    fuse_qkv: bool = False
    """Attention computes q/k/v (or k/v) with one fused projection (diffusers' ``fuse_qkv_projections``);
    LoRA fusing keeps the fused copy in sync."""
    max_autotune: bool = False
    cuda_graphs: bool = False
    """On CUDA, replay each compiled forward (and each DeepCache pass, and the eager text encoders)
    as one CUDA graph per input shape: no per-kernel launch cost. Parameters are read in place."""
    components: List[str] = field(default_factory=lambda: ["unet", "transformer", "controlnet", "vae.decoder"])
    text_encoders: bool = False
    graph: Graph = Graph.aot
    """``aot``: graphs captured ahead of time, saved and loaded by the graph cache without re-tracing;
    ``dynamo``: torch.compile's usual lazy path (the graph cache then keeps Inductor's artifacts)."""
    vae_dtype: Optional[VaeDtype] = None
    """Run the VAE in this dtype on CUDA (``bfloat16``: no fp32 upcast needed, about 3x faster decode)."""
    progressive: bool = False
    """On a graph-cache miss, serve from regional graphs (``regions``, default transformer and resnet
    blocks) while a background process compiles the whole-component graphs into the cache; switch
    to them when they land. Needs ``graph: aot``, ``cache.enabled`` and DeepCache off."""
    pil_on_device: bool = True
    """Convert decoded images to 8-bit on the device (bit-identical to diffusers' NumPy conversion;
    saves a 12 MB copy and the CPU pass at the end of each call)."""
    attention: Attention = Attention.auto
    """The fused attention kernel traced into whole-component graphs: ``auto`` takes cuDNN's on Hopper
    (faster than FlashAttention-2 at SDXL's shapes); a kernel that cannot take a shape falls through."""
    inductor: Dict[str, Any] = field(default_factory=dict)
    """Extra Inductor config (``torch._inductor.config``) keys, e.g. ``conv_1x1_as_mm: true``."""

    def validate(self, prefix: str = "compile.") -> None:
        """Checks types cannot express; ``prefix`` names the keys as the user wrote them."""
        for name in self.regions:
            if not str(name).isidentifier():
                raise ConfigError(f"{prefix}regions: {name!r} is not a class name; expected names such as "
                                  "BasicTransformerBlock")
