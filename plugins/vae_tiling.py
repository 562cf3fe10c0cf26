"""Plugin stage ``vae-tiling``: decode large images in overlapping tiles.

At 2048 px and above the VAE decoder's activations, not the UNet, set peak memory. Tiling
bounds them by the tile size at a small cost in speed, with blended seams. It is also the example
to copy when writing a plugin: a module that registers a ``Stage`` by name, declares its options dataclass
(read from ``plugin_options.vae_tiling``) and the stages it must precede, and does nothing when disabled.

    python -m onediffx run plugins=[vae_tiling] 'stages=[lora-fuse,deepcache,vae-tiling,compile]' \\
        plugin_options.vae_tiling.tile_size=512
"""

from __future__ import annotations

from dataclasses import dataclass

from onediffx.errors import ConfigError, NotAvailableError
from onediffx.registry import register_stage
from onediffx.stages.base import Assembly, Stage


@dataclass
class VaeTilingOptions:
    """``plugin_options.vae_tiling``: ``plan()`` merges the mapping into this (unknown keys and wrong
    types fail with their path), calls ``validate``, and hands the object to the stage."""

    enabled: bool = True
    tile_size: int = 0
    """Tile edge in pixels; 0 keeps the VAE's own (its ``sample_size``)."""
    overlap: float = 0.25
    slicing: bool = False
    """Also decode a batch one image at a time."""

    def validate(self, prefix: str = "plugin_options.vae_tiling.") -> None:
        """Ranges types cannot express, named by their key path."""
        if self.tile_size < 0 or self.tile_size % 8:
            raise ConfigError(f"{prefix}tile_size: {self.tile_size} is not allowed; expected 0 or a positive multiple of 8")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"{prefix}overlap: {self.overlap} is not allowed; expected 0 <= overlap < 1")


@register_stage("vae-tiling")
class VaeTilingStage(Stage[VaeTilingOptions]):
    """Decode with a tiled VAE so peak memory stops growing with resolution."""

    group = "plugin_options.vae_tiling"
    options = VaeTilingOptions
    before = ("quantize", "warmup")
    """Both decode whole images (quantize's quality check, warm-up): untiled, they would set the
    peak this stage exists to bound."""

    def enabled(self, asm: Assembly, opts: VaeTilingOptions) -> bool:
        return opts.enabled

    def apply(self, asm: Assembly, opts: VaeTilingOptions) -> None:
        vae = asm.pipe.vae
        if not hasattr(vae, "use_tiling"):
            raise NotAvailableError(f"vae-tiling: {type(vae).__name__} has no tiled decoding; remove vae-tiling from stages")
        vae.enable_tiling()
        if opts.tile_size:
            vae.tile_sample_min_size = opts.tile_size
            vae.tile_latent_min_size = opts.tile_size // 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_overlap_factor = opts.overlap
        if opts.slicing:
            vae.enable_slicing()
        asm.note(self.name, tile_size=vae.tile_sample_min_size, overlap=vae.tile_overlap_factor, slicing=opts.slicing)
