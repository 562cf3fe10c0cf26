"""The ``quantize`` stage: ``quantize_pipe`` with the ``quantize`` group's options.

It runs before LoRA fusing (which then fuses from the kept high-precision originals and
re-quantizes) and before compiling (graphs are traced over the quantized weights). q/k/v
projections are fused first (``quantize.fuse_qkv``), so the fused projection is the one quantized.
With ``quantize.quality`` it generates the run's first image before and after quantizing and
reports PSNR, SSIM and one UNet output's relative error.
"""

from __future__ import annotations

from typing import Any, Optional

from omegaconf import DictConfig

from ..errors import NotAvailableError
from ..quantize.config import QuantizeConfig
from ..registry import register_stage
from .base import Assembly, Stage

PREFIX = "quantize"


@register_stage("quantize")
class QuantizeStage(Stage[QuantizeConfig]):
    """Quantize the UNet's (and optionally ControlNet's, VAE decoder's) linear layers: fp8 or int8, via torchao."""

    group = "quantize"
    options = QuantizeConfig

    def check(self, config: QuantizeConfig, cfg: DictConfig) -> None:
        import importlib.util

        if not config.enabled:
            return
        if importlib.util.find_spec("torchao") is None:
            raise NotAvailableError(f"{PREFIX}={config.mode.value}: torchao is not installed; "
                                    "pip install 'onediffx[quantize]' (or torchao), or use quantize=off")
        from ..device import resolve_device
        from ..quantize.modes import check_supported

        check_supported(config.mode, resolve_device(cfg.device), PREFIX)  # before the model loads

    def enabled(self, asm: Assembly, config: QuantizeConfig) -> bool:
        return config.enabled

    def apply(self, asm: Assembly, config: QuantizeConfig) -> None:
        from ..quantize.pipe import quantize_pipe, quantize_state

        quality = _Quality(asm) if config.quality else None
        quantize_pipe(asm.pipe, options=config, calibration=_calibration_folder(asm))
        state = quantize_state(asm.pipe)
        if state.dtype_from is not None:
            import torch

            asm.dtype = getattr(torch, state.dtype)
        asm.note(self.name, **state.facts())
        if quality is not None:
            asm.note(self.name, quality=quality.after(asm))


def _calibration_folder(asm: Assembly) -> Optional[Any]:
    """Calibrated ranges live beside the graph cache, so a restart reuses both (``None``: cache off)."""
    from ..quantize.calibrate import folder_beside

    return folder_beside(asm.cfg.cache.dir) if asm.cfg.cache.enabled else None


class _Quality:
    """The unquantized first image and first UNet call, then the same after quantizing."""

    def __init__(self, asm: Assembly) -> None:
        from ..generate import Settings, generate
        from ..quantize.quality import capture_first_call

        self.settings = Settings.from_config(asm.cfg, seeds=[asm.cfg.seed])
        from ..denoiser import denoiser

        self.unet = denoiser(asm.pipe)
        if self.unet is None:
            self.reference = generate(asm, self.settings)
            self.captured = None
            return
        with capture_first_call(self.unet) as self.captured:
            self.reference = generate(asm, self.settings)

    def after(self, asm: Assembly) -> dict[str, Any]:
        from ..generate import generate
        from ..quantize.quality import image_fidelity, output_error

        test = generate(asm, self.settings)
        psnr, ssim = image_fidelity(self.reference.images[0], test.images[0])
        error = output_error(self.unet, self.captured) if self.captured is not None else None
        return {"psnr_db": round(psnr, 2), "ssim": None if ssim is None else round(ssim, 4),
                "unet_rel_error": None if error is None else round(error, 5),
                "seed": self.settings.seeds[0], "steps": self.settings.steps,
                "reference": "the same pipeline unquantized, same seed, eager",
                "seconds_unquantized": round(self.reference.seconds, 3), "seconds_quantized": round(test.seconds, 3)}
