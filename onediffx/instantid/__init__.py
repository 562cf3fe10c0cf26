"""InstantID: SDXL + IdentityNet (a ControlNet reading face tokens) + IP-Adapter face tokens.

Built from diffusers' parts (``StableDiffusionXLControlNetPipeline``, ``load_ip_adapter``) and one
named hook; see ``hook``. ``attach_face_adapter`` makes a ControlNet pipeline InstantID,
``face_embeds`` gives a call's ``ip_adapter_image_embeds``, ``draw_kps`` its condition image.
Attributes load on first use, so the config schema can use ``FaceConfig`` without importing torch.
"""

from ..lazy_exports import lazy_getattr

_EXPORTS = {
    "FaceConfig": "config", "CachedSteps": "config", "check_face": "config", "is_instantid": "config",
    "Face": "face", "FaceError": "face", "draw_kps": "face", "load_face": "face", "detect_face": "face",
    "write_face": "face", "face_from_config": "face", "save_face": "face", "synthetic_face": "face",
    "read_face_adapter": "weights", "convert": "weights", "synthetic_face_adapter": "weights",
    "load_identitynet": "weights",
    "IdentityNetHook": "hook", "InstantIDMixin": "hook", "attach_face_adapter": "hook", "face_embeds": "hook",
    "set_ip_adapter_scale": "hook", "is_instantid_pipeline": "hook",
    "call_arguments": "call",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
