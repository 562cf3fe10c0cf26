"""Structured configs: the types and defaults of every key ``conf/`` may set.

Hydra merges ``conf/`` and the command line into these dataclasses, so a wrong type or an unknown
key fails at composition with its key path. Ranges that types cannot express (steps > 0, sizes
that are multiples of 8) are checked in ``onediffx.config.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Which diffusers pipeline, where its weights are, and its sensible defaults."""

    name: str = "tiny"
    pipeline: str = "StableDiffusionPipeline"
    """A name from the allow-list in ``onediffx.models.pipelines`` (never an import path)."""
    pretrained: Optional[str] = None
    """Hub id, looked up in the local Hugging Face cache only."""
    path: Optional[str] = None
    """Local folder (``save_pretrained`` layout) or single ``.safetensors`` file; wins over ``pretrained``."""
    builtin: Optional[str] = None
    """A built-in tiny model (``tiny``, ``tiny_xl``, ``tiny_svd``, ``tiny_controlnet``, ...)."""
    synthetic: bool = False
    """Build the full architecture with seeded random weights (benchmarks without downloads)."""
    arch: Optional[str] = None
    """Embedded architecture used when ``synthetic`` is true (``sd15``, ``sd21``, ``sdxl``, ``svd``)."""
    unet: Optional[str] = None
    """Hub id or folder of a replacement UNet (LCM-SDXL)."""
    controlnet: Optional[str] = None
    """Hub id or folder of the ControlNet, for ControlNet pipelines."""
    scheduler: Optional[str] = None
    """A scheduler class name from the allow-list; ``None`` keeps the checkpoint's own."""
    dtype: str = "float16"
    """Weights dtype on an accelerator (the CPU always runs float32 unless ``dtype`` is set)."""
    variant: Optional[str] = None
    height: int = 512
    width: int = 512
    steps: int = 30
    guidance: float = 7.5
    num_frames: Optional[int] = None
    """Video models: frames per clip."""


@dataclass
class CompileConfig:
    """How the heavy components are compiled (``compile=none|inductor|inductor_max|regional|auto``)."""

    backend: str = "none"
    mode: Optional[str] = None
    fullgraph: bool = True
    dynamic: Optional[bool] = False
    regional: bool = False
    channels_last: bool = True
    fuse_qkv: bool = False
    max_autotune: bool = False
    cuda_graphs: bool = False
    components: List[str] = field(default_factory=lambda: ["unet", "transformer", "controlnet", "vae.decoder"])
    text_encoders: bool = False


@dataclass
class DeepCacheConfig:
    """Reuse deep UNet features across steps (``deepcache=off|i2|i3|i5``)."""

    enabled: bool = False
    cache_interval: int = 3
    cache_layer_id: int = 0
    cache_block_id: int = 0
    cache_branch: int = 0
    """SVD only: which skip branch keeps being recomputed."""
    schedule: str = "uniform"
    """``uniform`` (every ``cache_interval`` steps) or ``nonuniform`` (the paper's denser start)."""


@dataclass
class LoraEntry:
    """One LoRA in the stack; ``lora=[a,b]`` fuses entries in list order."""

    source: str = MISSING
    """Hub id (local cache only), local file, or local folder."""
    weight_name: Optional[str] = None
    scale: float = 1.0
    adapter_name: Optional[str] = None
    """Defaults to the entry's key in ``lora``."""
    base: Optional[str] = None
    """Base family it was trained for (``sd15``, ``sdxl``), shown by ``onediffx list``."""


@dataclass
class CacheConfig:
    """Where compiled graphs are saved and loaded from."""

    enabled: bool = True
    dir: str = "${oc.env:ONEDIFFX_CACHE_DIR,${oc.env:HOME,.}/.cache/onediffx/graphs}"


@dataclass
class ShapeConfig:
    height: int = MISSING
    width: int = MISSING
    batch: int = 1


@dataclass
class WarmupConfig:
    """Calls made before timing, so compilation happens before the first measured image."""

    runs: int = 1
    steps: int = 2
    shapes: List[ShapeConfig] = field(default_factory=list)
    """Resolutions to prepare; empty means the run's own resolution."""
    unprepared: str = "compile"
    """What a shape outside ``shapes`` does: ``compile`` once, or run ``eager``."""


DEFAULT_STAGES = ["lora-fuse", "deepcache", "compile", "load-graph", "warmup", "save-graph"]


@dataclass
class RunConfig:
    """The top config of ``python -m onediffx run``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    deepcache: DeepCacheConfig = field(default_factory=DeepCacheConfig)
    lora: Dict[str, LoraEntry] = field(default_factory=dict)
    cache: CacheConfig = field(default_factory=CacheConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    stages: List[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    plugins: List[str] = field(default_factory=list)
    """Plugins to load by name: a module in the repository's ``plugins/`` or an installed entry point."""
    plugin_options: Dict[str, Any] = field(default_factory=dict)
    """Options of plugin stages, one mapping per stage group (``plugin_options.vae_tiling.tile=512``)."""

    prompt: str = "a photo of an astronaut riding a horse on the moon"
    negative_prompt: Optional[str] = None
    seed: int = 0
    num_images: int = 1
    """Images per prompt; image ``i`` uses seed ``seed + i``."""
    height: Optional[int] = None
    """``None`` takes the model's default."""
    width: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    image: Optional[str] = None
    """Conditioning image for ControlNet and video models; ``None`` uses a built-in test pattern."""
    repeat: int = 1
    """Generate this many times and report the median latency."""
    device: str = "auto"
    dtype: str = "auto"
    """``auto``: the model's dtype on an accelerator, float32 on the CPU."""


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore, where ``conf/*.yaml`` defaults lists refer to them."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
