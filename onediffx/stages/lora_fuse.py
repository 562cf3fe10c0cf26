"""The ``lora-fuse`` stage: fuse the ``lora`` stack into the pipeline's weights.

``lora=[emoji,metal]`` composes an ordered mapping; every entry is loaded and checked first, then
the whole stack is fused once from the original weights with each entry's ``scale``. A stack that
fails anywhere leaves the pipeline as it was, and the error names the entry (``lora.<key>``).
"""

from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig

from ..config.schema import LoraStack
from ..errors import ConfigError, OnediffxError
from ..registry import register_stage
from .base import Assembly, Stage

_FAMILIES = {
    "sd15": "sd", "sd14": "sd", "sd21": "sd", "sd2": "sd", "sdxl": "sdxl",
    "flux": "flux", "flux_dev": "flux", "flux_schnell": "flux",
    "sd3": "sd3", "sd35": "sd3", "sd35_large": "sd3", "sd35_medium": "sd3",
}


def _model_family(model: DictConfig) -> Optional[str]:
    """``sdxl``, ``sd`` (1.x/2.x), ``flux`` or ``sd3`` when the model config says so; None when it cannot tell."""
    arch = model.get("arch")
    if arch in _FAMILIES:
        return _FAMILIES[arch]
    pipeline = str(model.get("pipeline") or "")
    if pipeline.startswith("StableDiffusionXL"):
        return "sdxl"
    if pipeline.startswith("Flux"):
        return "flux"
    if pipeline.startswith("StableDiffusion3"):
        return "sd3"
    if pipeline.startswith("StableDiffusion") and not pipeline.startswith(("StableDiffusion3", "StableDiffusionXL")):
        return "sd"
    return None


@register_stage("lora-fuse")
class LoraFuseStage(Stage[LoraStack]):
    """Fuse the LoRA stack (``lora=[...]``) into the weights, in list order, with each entry's scale."""

    group = "lora"
    options = LoraStack
    after = ("quantize",)
    """``quantize_pipe`` refuses a pipeline with LoRAs loaded; fusing into quantized weights works."""

    def check(self, stack: LoraStack, cfg: DictConfig) -> None:
        from ..lora.sources import resolve_file

        family = _model_family(cfg.model)
        for key, entry in stack.entries.items():
            base = _FAMILIES.get(str(entry.base)) if entry.base else None
            if base and family and base != family:
                raise ConfigError(
                    f"lora.{key}: made for {entry.base} but model {cfg.model.name} is {family}; "
                    f"choose a LoRA for this model or drop it from lora=[...]"
                )
            try:
                resolve_file(entry.source, entry.weight_name)
            except OnediffxError as e:
                raise type(e)(f"lora.{key}: {e}") from None

    def enabled(self, asm: Assembly, stack: LoraStack) -> bool:
        return bool(stack.entries)

    def apply(self, asm: Assembly, stack: LoraStack) -> None:
        from ..lora import delete_adapters, load_lora_and_optionally_fuse, set_and_fuse_adapters
        from ..lora.fuse import state_of

        names, scales = [], []
        originals = getattr(asm.cfg.get("lora_originals"), "value", asm.cfg.get("lora_originals")) or "cpu"
        # W0 on the CPU for a run (it fuses once); on the weights' device for a server, which re-fuses
        # between batches ("cuda" means the weight's own device, and the CPU where there is no GPU).
        offload = "cuda" if originals == "device" else "cpu"
        for key, entry in stack.entries.items():
            name = entry.adapter_name
            try:
                load_lora_and_optionally_fuse(
                    asm.pipe, entry.source, name, fuse=False, offload_device=offload, offload_weight="weight",
                    weight_name=entry.weight_name,
                )
            except OnediffxError as e:
                delete_adapters(asm.pipe, names)
                raise type(e)(f"lora.{key}: {e}") from None
            names.append(name)
            scales.append(float(entry.scale))
        set_and_fuse_adapters(asm.pipe, names, scales)
        state = state_of(asm.pipe)
        asm.note(self.name, adapters=dict(zip(names, scales)), layers=len(state.fused), originals=originals)
