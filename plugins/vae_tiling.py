"""Plugin stage ``vae-tiling``: decode large images in overlapping tiles.

At 2048 px and above the VAE decoder's activations, not the UNet, set peak memory. Tiling
bounds them by the tile size at a small cost in speed, with blended seams. It is also the example
to copy when writing a plugin: a module that registers a ``Stage`` by name, reads its options from
``plugin_options.<group>``, and does nothing when disabled.

    python -m onediffx run plugins=[vae_tiling] 'stages=[lora-fuse,deepcache,vae-tiling,compile]' \\
        plugin_options.vae_tiling.tile_size=512
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from onediffx.errors import ConfigError, NotAvailableError
from onediffx.registry import register_stage
from onediffx.stages.base import Assembly, Stage


@dataclass
class VaeTilingOptions:
    enabled: bool = True
    tile_size: int = 0
    """Tile edge in pixels; 0 keeps the VAE's own (its ``sample_size``)."""
    overlap: float = 0.25
    slicing: bool = False
    """Also decode a batch one image at a time."""


def options(cfg: DictConfig) -> VaeTilingOptions:
    """This stage's options, type-checked against ``VaeTilingOptions``."""
    given = cfg.plugin_options.get("vae_tiling", {})
    try:
        merged = OmegaConf.merge(OmegaConf.structured(VaeTilingOptions), given)
    except Exception as err:  # OmegaConf's validation errors name the bad key
        raise ConfigError(f"plugin_options.vae_tiling: {err}".splitlines()[0]) from err
    return OmegaConf.to_object(merged)


@register_stage("vae-tiling")
class VaeTilingStage(Stage):
    """Decode with a tiled VAE so peak memory stops growing with resolution."""

    group = "vae_tiling"

    def check(self, cfg: DictConfig) -> None:
        opts = options(cfg)
        if opts.tile_size < 0 or opts.tile_size % 8:
            raise ConfigError(f"plugin_options.vae_tiling.tile_size: {opts.tile_size} is not allowed; expected 0 or a positive multiple of 8")
        if not 0 <= opts.overlap < 1:
            raise ConfigError(f"plugin_options.vae_tiling.overlap: {opts.overlap} is not allowed; expected 0 <= overlap < 1")

    def enabled(self, asm: Assembly) -> bool:
        return options(asm.cfg).enabled

    def apply(self, asm: Assembly) -> None:
        vae, opts = asm.pipe.vae, options(asm.cfg)
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
