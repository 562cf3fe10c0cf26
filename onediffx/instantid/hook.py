"""InstantID on diffusers' SDXL ControlNet pipeline: face tokens for the IdentityNet, as a hook.

diffusers already runs most of InstantID: ``load_ip_adapter`` converts the face adapter into an
``IPAdapterPlusImageProjection`` (the Resampler) and ``IPAdapterAttnProcessor2_0`` processors
(``to_k_ip``/``to_v_ip``), and the pipeline's ``ip_adapter_image_embeds`` carries the face
embedding into the UNet. What diffusers' ControlNet pipeline does not do is InstantID's one
change to the loop: the IdentityNet's cross-attention reads the face tokens, not the prompt.

Two small pieces do it, and no pipeline code is copied:

* ``InstantIDMixin``, added to the pipeline's class (same name, as ``onediffx.deep_cache`` does),
  overrides only ``prepare_ip_adapter_image_embeds``: it calls diffusers' own, projects the result
  once per call with the UNet's own projection (the same tokens the UNet computes at each step, in
  the same negative/positive batch layout) and hands them to the IdentityNet's hook.
* ``IdentityNetHook``, a named hook in the ControlNet's ``HookRegistry``, replaces
  ``encoder_hidden_states`` by those tokens. Under DeepCache (asked of the UNet's registry) it also
  skips the IdentityNet on cached steps and returns the residuals of the last full step, so cached
  steps cost the shallow UNet only.

The hook is on for the duration of each call only, over whatever compile installed: ahead-of-time
ControlNet graphs stay saveable and are entered with the face tokens as an ordinary input.

``ip_adapter_scale`` is folded into the ``to_v_ip`` weights (attention is linear in its values),
the processors' own ``scale`` staying 1: compiled graphs read weights at each call, whereas a
Python float would be baked into them.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..hooks import DEEP_CACHE_DISPATCH, ForwardHook, add_hook, get_hook, hook_registry, remove_hook
from ..mixins import with_mixin
from ..state import IP_ADAPTER_SCALE, IP_ORIGINALS

IDENTITYNET = "onediffx_instantid_identitynet"
"""The ControlNet's forward reads face tokens (and, under DeepCache, runs on full steps only)."""


def _unwrap(module: Any) -> Any:
    return getattr(module, "_orig_mod", module)


class IdentityNetHook(ForwardHook):
    """The IdentityNet's forward: face tokens instead of the prompt, and DeepCache's cached steps skipped."""

    hook_name = IDENTITYNET

    def __init__(self, controlnet: nn.Module) -> None:
        super().__init__(controlnet)
        self.tokens: Optional[torch.Tensor] = None
        """Face tokens of the running call, batch laid out as the UNet's (negative half first under CFG)."""
        self.unet: Optional[nn.Module] = None
        self.skip_cached_steps = True
        self.last: Any = None
        """The residuals of the last full step, while DeepCache is armed."""
        self.calls = 0
        self.skipped = 0

    def _deep_cache(self) -> Any:
        state = get_hook(self.unet, DEEP_CACHE_DISPATCH) if self.unet is not None else None
        return state if state is not None and state.schedule is not None else None

    @torch.compiler.disable(recursive=False)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        cache = self._deep_cache() if self.skip_cached_steps else None
        if cache is not None and self.last is not None and not cache.next_is_full():
            self.skipped += 1
            return self.last
        prompt = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        tokens = self.for_batch(prompt.shape[0] if prompt is not None else None)
        if len(args) > 2:
            args = (*args[:2], tokens, *args[3:])
        else:
            kwargs["encoder_hidden_states"] = tokens
        out = self.inner(*args, **kwargs)
        self.last = out if cache is not None else None
        return out

    def for_batch(self, batch: Optional[int]) -> torch.Tensor:
        """The tokens for a ControlNet batch: all of them, or the positive half (``guess_mode`` under CFG)."""
        tokens = self.tokens
        if tokens is None:
            raise ConfigError("InstantID: the IdentityNet got no face tokens; call the pipeline with "
                              "ip_adapter_image_embeds=onediffx.instantid.face_embeds(pipe, embedding, guidance_scale)")
        if batch is None or tokens.shape[0] == batch:
            return tokens
        if tokens.shape[0] == 2 * batch:
            return tokens[batch:]
        raise ConfigError(f"InstantID: {tokens.shape[0]} face token sets for a ControlNet batch of {batch}; "
                          "give ip_adapter_image_embeds with the batch layout diffusers expects")


def identitynet_hook(controlnet: nn.Module) -> IdentityNetHook:
    """The hook on ``controlnet``, added (outermost) if absent."""
    hook = get_hook(controlnet, IDENTITYNET)
    if hook is None:
        hook = add_hook(controlnet, IdentityNetHook(controlnet))
    return hook


def remove_identitynet_hook(controlnet: nn.Module) -> bool:
    return remove_hook(controlnet, IDENTITYNET)


def project_face(unet: nn.Module, image_embeds: list[torch.Tensor]) -> torch.Tensor:
    """Face tokens ``(batch, tokens, width)`` from the pipeline's prepared ``image_embeds``, by the UNet's projection."""
    projected = unet.encoder_hid_proj(image_embeds)[0]
    return projected.reshape(projected.shape[0], -1, projected.shape[-1])


class InstantIDMixin:
    """Hands the face tokens of each call to the IdentityNet; diffusers' pipeline otherwise unchanged.

    The IdentityNet's hook is on only during a call (added over whatever compile installed, removed
    after), so ``compile_pipe`` before or after a first call finds the ControlNet as diffusers made it
    and compiles it into saveable ahead-of-time graphs.
    """

    identitynet_skips_cached_steps: bool = True
    """Under DeepCache, reuse the IdentityNet's residuals on cached steps (``face.controlnet_on_cached_steps``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)

        def __call__(self, *args: Any, **kw: Any) -> Any:
            return InstantIDMixin.__call__(self, *args, **kw)

        base = next(c for c in cls.__mro__ if not issubclass(c, InstantIDMixin) and "__call__" in c.__dict__)
        __call__.__signature__ = inspect.signature(base.__call__)
        __call__.__doc__ = base.__call__.__doc__
        cls.__call__ = __call__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        controlnet = _unwrap(self.controlnet)
        hook = identitynet_hook(controlnet)
        hook.unet, hook.skip_cached_steps = _unwrap(self.unet), self.identitynet_skips_cached_steps
        try:
            return super().__call__(*args, **kwargs)
        finally:
            counts = self.__dict__.setdefault("identitynet_counts", {"calls": 0, "skipped": 0})
            counts["calls"] += hook.calls
            counts["skipped"] += hook.skipped
            remove_identitynet_hook(controlnet)

    def prepare_ip_adapter_image_embeds(self, *args: Any, **kwargs: Any) -> Any:
        embeds = super().prepare_ip_adapter_image_embeds(*args, **kwargs)
        hook = get_hook(_unwrap(self.controlnet), IDENTITYNET)
        if hook is not None:
            hook.tokens = project_face(_unwrap(self.unet), embeds)
        return embeds


def instantid_class(base: type) -> type:
    """The InstantID variant of a diffusers ControlNet pipeline class, with the same name."""
    return with_mixin(InstantIDMixin, base, "feeding face tokens to its IdentityNet")


def is_instantid_pipeline(pipe: Any) -> bool:
    return isinstance(pipe, InstantIDMixin)


def _ip_processors(unet: nn.Module) -> list[Any]:
    return [p for p in unet.attn_processors.values() if hasattr(p, "to_v_ip")]


def set_ip_adapter_scale(pipe: Any, scale: float) -> None:
    """The weight of the face tokens in the UNet, folded into ``to_v_ip`` (compiled graphs follow it)."""
    unet = _unwrap(pipe.unet)
    old = IP_ADAPTER_SCALE.get(unet, 1.0)
    if scale == old:
        return
    processors = _ip_processors(unet)
    if not processors:
        raise ConfigError("face.ip_adapter_scale: the UNet has no IP-Adapter processors; load a face adapter first")
    with torch.no_grad():
        for proc in processors:
            kept = IP_ORIGINALS.clear(proc) if old == 0 else {}  # the unscaled weights, kept when the scale went to 0
            for i, layer in enumerate(proc.to_v_ip):
                if old == 0:
                    layer.weight.copy_(kept[i].to(layer.weight.device))
                    layer.weight.mul_(scale)
                else:
                    if scale == 0:
                        kept[i] = (layer.weight / old).to("cpu", copy=True)
                    layer.weight.mul_(scale / old)
            if scale == 0:
                IP_ORIGINALS.set(proc, kept)
            proc.scale = [1.0] * len(proc.scale)
    IP_ADAPTER_SCALE.set(unet, scale)


def attach_face_adapter(pipe: Any, state_dict: dict[str, dict[str, torch.Tensor]], scale: float = 1.0) -> Any:
    """Load InstantID's face adapter into ``pipe`` through diffusers' IP-Adapter loader and make it InstantID.

    ``pipe`` is an SDXL ControlNet pipeline whose ControlNet is the IdentityNet; it is changed in place
    and returned.
    """
    if getattr(pipe, "controlnet", None) is None:
        raise ConfigError(f"model.instantid: {type(pipe).__name__} has no ControlNet; InstantID needs "
                          "StableDiffusionXLControlNetPipeline with the IdentityNet")
    unet = _unwrap(pipe.unet)
    device, dtype = unet.device, unet.dtype
    state_dict = {part: {k: v.to(device=device, dtype=dtype) for k, v in sd.items()} for part, sd in state_dict.items()}
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "image_encoder is not loaded": InstantID brings its own embedding
    try:
        pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None)
    finally:
        diffusers_logging.set_verbosity(level)
    pipe.__class__ = instantid_class(type(pipe))
    IP_ADAPTER_SCALE.set(unet, 1.0)
    set_ip_adapter_scale(pipe, scale)
    return pipe


def face_embeds(pipe: Any, embedding: Any, guidance_scale: float, num_faces: int = 1) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` for one face: ``[zeros, face]`` under classifier-free guidance.

    The negative half is the zero embedding, projected like the face (as InstantID's reference does).
    """
    unet = _unwrap(pipe.unet)
    vector = torch.as_tensor(np.asarray(embedding, dtype=np.float32)).reshape(1, 1, 1, -1)
    cfg = guidance_scale > 1 and unet.config.time_cond_proj_dim is None
    batch = torch.cat([torch.zeros_like(vector), vector]) if cfg else vector
    return [batch.to(device=unet.device, dtype=unet.dtype)]
