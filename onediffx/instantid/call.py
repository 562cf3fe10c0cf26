"""The pipeline arguments of one InstantID call, from the ``face`` config group."""

from __future__ import annotations

from typing import Any

from .config import CachedSteps
from .face import draw_kps, face_from_config
from .hook import face_embeds, set_ip_adapter_scale


def call_arguments(pipe: Any, face_cfg: Any, width: int, height: int, guidance_scale: float) -> dict[str, Any]:
    """``image`` (the key points drawn at the output size), ``ip_adapter_image_embeds`` and the scale.

    Also sets ``ip_adapter_scale`` (folded into weights: a no-op when unchanged) and tells the
    IdentityNet's hook what to do on DeepCache's cached steps.
    """
    face = face_from_config(face_cfg)
    set_ip_adapter_scale(pipe, float(face_cfg.ip_adapter_scale))  # no-op unless it changed
    pipe.identitynet_skips_cached_steps = CachedSteps(face_cfg.controlnet_on_cached_steps) is CachedSteps.skip
    return {
        "image": draw_kps((width, height), face.kps_for(width, height)),
        "ip_adapter_image_embeds": face_embeds(pipe, face.embedding, guidance_scale),
        "controlnet_conditioning_scale": float(face_cfg.controlnet_conditioning_scale),
    }
