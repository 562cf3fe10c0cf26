"""Turn the ``model`` group into a diffusers pipeline on a device.

Weights come from exactly one place, in this order: a built-in tiny model, synthetic weights,
``model.path`` (folder or single file), or ``model.pretrained`` in the local Hugging Face cache.
Nothing is downloaded: a missing id is one ``NotFoundError`` that says how to get it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ..errors import ConfigError, NotFoundError
from .pipelines import PIPELINES, SCHEDULERS

SINGLE_FILE_SUFFIXES = {".safetensors"}


def pipeline_class(name: str) -> type:
    """The allow-listed diffusers pipeline class called ``name``."""
    if name not in PIPELINES:
        raise ConfigError(f"model.pipeline: {name!r} is not supported; choose one of {', '.join(PIPELINES)}")
    return PIPELINES[name]


def _missing(key: str, repo_id: str) -> NotFoundError:
    return NotFoundError(
        f"{key}: {repo_id!r} is not in the local Hugging Face cache; download it with "
        f"`hf download {repo_id}`, set {key.rsplit('.', 1)[0]}.path to a local copy, "
        "or run with model.synthetic=true for benchmarks"
    )


def _from_hub_or_folder(cls: type, source: str, key: str, **kwargs: Any):
    """``from_pretrained`` restricted to local files, with one clear line when absent."""
    try:
        return cls.from_pretrained(source, local_files_only=True, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise NotFoundError(f"{key}: {source!r} is not a loadable {cls.__name__} folder: {err}") from err
        if kwargs.get("variant"):  # fall back to the non-variant files of the same checkpoint
            kwargs = {k: v for k, v in kwargs.items() if k != "variant"}
            return _from_hub_or_folder(cls, source, key, **kwargs)
        raise _missing(key, source) from err


def _check_safetensors(path: Path) -> None:
    """A file named ``.safetensors`` that is not one (a renamed pickle, a truncated download) is one
    line now, before diffusers starts guessing the checkpoint's layout from it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ConfigError(f"model.path: {str(path)!r} is not a readable safetensors file ({reason}); "
                          "give a .safetensors checkpoint or a diffusers folder") from None


def _load_path(cls: type, path: str, dtype: torch.dtype, variant: str | None):
    p = Path(path).expanduser()
    if not p.exists():
        raise NotFoundError(f"model.path: {path!r} does not exist; point it at a diffusers folder or a .safetensors file")
    if p.is_file():
        if p.suffix not in SINGLE_FILE_SUFFIXES:
            raise ConfigError(f"model.path: {path!r} is not a .safetensors file; pickle checkpoints are not loaded")
        _check_safetensors(p)
        return cls.from_single_file(str(p), torch_dtype=dtype, local_files_only=True)
    return _from_hub_or_folder(cls, str(p), "model.path", torch_dtype=dtype, variant=variant)


def _extra_components(cfg: DictConfig, dtype: torch.dtype) -> dict[str, Any]:
    """ControlNet and replacement UNet named beside the base checkpoint."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    extra: dict[str, Any] = {}
    if cfg.controlnet:
        extra["controlnet"] = _from_hub_or_folder(ControlNetModel, cfg.controlnet, "model.controlnet", torch_dtype=dtype)
    elif cfg.instantid:  # the IdentityNet: ControlNetModel/ of the InstantID checkpoint
        from ..instantid.weights import load_identitynet

        extra["controlnet"] = load_identitynet(cfg.instantid, dtype)
    if cfg.unet:
        extra["unet"] = _from_hub_or_folder(UNet2DConditionModel, cfg.unet, "model.unet", torch_dtype=dtype, variant=cfg.variant)
    return extra


def _build(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """Weights from, in order: synthetic, ``path``, a built-in model, ``pretrained``."""
    if cfg.synthetic:
        from .synthetic import build_synthetic

        if not cfg.arch:
            raise ConfigError(f"model.arch: model {cfg.name!r} has no embedded architecture for model.synthetic=true")
        return build_synthetic(cfg.arch, device, dtype, controlnet=bool(cfg.controlnet or cfg.instantid))
    cls = pipeline_class(cfg.pipeline)
    if cfg.path:
        pipe = _load_path(cls, cfg.path, dtype, cfg.variant)
        extra = _extra_components(cfg, dtype)
        if extra:
            pipe.register_modules(**extra)
        return pipe
    if cfg.builtin:
        from .tiny import BUILDERS

        if cfg.builtin not in BUILDERS:
            raise ConfigError(f"model.builtin: unknown built-in model {cfg.builtin!r}; known: {', '.join(BUILDERS)}")
        pipe = BUILDERS[cfg.builtin]()
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    extra = _extra_components(cfg, dtype)
    if not cfg.pretrained:
        raise ConfigError(f"model: {cfg.name!r} sets none of model.builtin, model.path, model.pretrained, model.synthetic")
    return _from_hub_or_folder(cls, cfg.pretrained, "model.pretrained", torch_dtype=dtype, variant=cfg.variant, **extra)


def _attach_instantid(pipe: Any, cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """InstantID's face adapter on the UNet: seeded for ``synthetic``, else from the checkpoint folder."""
    from ..instantid.hook import attach_face_adapter
    from ..instantid.weights import (adapter_file, instantid_folder, read_face_adapter, seed_zero_convolutions,
                                     synthetic_face_adapter)

    if cfg.synthetic:
        pipe = pipe.to(device)
        seed_zero_convolutions(pipe.controlnet)
        state_dict = synthetic_face_adapter(pipe.unet, device=device, dtype=dtype)
    else:
        state_dict = read_face_adapter(adapter_file(instantid_folder(cfg.instantid)))
    return attach_face_adapter(pipe, state_dict)


def scheduler_class(name: str) -> type:
    """The allow-listed diffusers scheduler class called ``name``."""
    if name not in SCHEDULERS:
        raise ConfigError(f"model.scheduler: {name!r} is not supported; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def load_pipeline(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """Build the pipeline the ``model`` group describes, on ``device`` in ``dtype``."""
    pipeline_class(cfg.pipeline)  # both checks run before any weights load
    scheduler = scheduler_class(cfg.scheduler) if cfg.scheduler else None
    pipe = _build(cfg, device, dtype)
    if cfg.instantid and not cfg.builtin:  # built-in InstantID models come with their face adapter
        pipe = _attach_instantid(pipe, cfg, device, dtype)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(desc="denoising", leave=False)
    return pipe
