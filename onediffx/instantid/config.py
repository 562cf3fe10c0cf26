"""The ``face`` config group: which face an InstantID run keeps, and how strongly.

Checked before any weights load (``check_face``), so a missing file or a face input given twice
costs a fraction of a second. This module imports nothing heavy: composing a config must not
import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, NotFoundError

INSTANTID_BUILTINS = ("tiny_instantid",)


class CachedSteps(str, Enum):
    """What the IdentityNet does on DeepCache's cached steps (``face.controlnet_on_cached_steps``)."""

    skip = "skip"
    """Reuse the residuals of the last full step: the ControlNet runs on full steps only."""
    run = "run"
    """Run the ControlNet at every step (only the UNet's deep features are cached)."""


@dataclass
class FaceConfig:
    """One face: from an image (insightface) or from a saved embedding and its five key points."""

    image: Optional[str] = None
    """A photo; insightface's antelopev2 models find the largest face in it (needs ``models_dir``)."""
    models_dir: Optional[str] = None
    """Folder holding insightface's ``antelopev2`` models (the folder itself, or a root with ``models/antelopev2``)."""
    embedding: Optional[str] = None
    """A ``.npy`` file with the 512-d face embedding (``python -m onediffx.instantid.face`` writes one)."""
    kps: Optional[str] = None
    """A ``.json`` file with the five key points: ``{"kps": [[x, y] x5], "width": W, "height": H}``."""
    ip_adapter_scale: float = 0.8
    """Weight of the face tokens in the UNet's cross-attention (folded into ``to_v_ip``: no recompile)."""
    controlnet_conditioning_scale: float = 0.8
    """Weight of the IdentityNet's residuals."""
    controlnet_on_cached_steps: CachedSteps = CachedSteps.skip
    """With DeepCache: ``skip`` the IdentityNet on cached steps (reuse its last residuals) or ``run`` it."""


def is_instantid(model: Any) -> bool:
    """Whether the ``model`` group describes an InstantID pipeline."""
    return bool(getattr(model, "instantid", None)) or getattr(model, "builtin", None) in INSTANTID_BUILTINS


def _file(key: str, value: str, suffixes: tuple[str, ...], what: str) -> None:
    path = Path(value).expanduser()
    if not path.is_file():
        raise NotFoundError(f"{key}: {value!r} does not exist; give the path of {what}")
    if path.suffix.lower() not in suffixes:
        raise ConfigError(f"{key}: {value!r} is not a {' or '.join(suffixes)} file; give {what}")


def check_face(cfg: Any) -> None:
    """One ``ConfigError``/``NotFoundError`` line for a face input an InstantID run cannot use."""
    face = getattr(cfg, "face", None)
    if face is None or not is_instantid(cfg.model):
        return
    for key in ("ip_adapter_scale", "controlnet_conditioning_scale"):
        value = face[key]
        if not -10.0 <= value <= 10.0:
            raise ConfigError(f"face.{key}: {value} is out of range; use a number from -10 to 10 (0 turns it off)")
    given_files = face.embedding is not None or face.kps is not None
    if face.image is not None and given_files:
        raise ConfigError("face: give either face.image (with face.models_dir) or face.embedding and face.kps, not both")
    if face.image is not None:
        _file("face.image", face.image, (".jpg", ".jpeg", ".png", ".webp", ".bmp"), "a photo with one face")
        if face.models_dir is None:
            raise ConfigError("face.models_dir: face.image needs insightface's antelopev2 models; set face.models_dir "
                              "to their folder, or give face.embedding=face.npy face.kps=kps.json instead")
    else:
        if face.embedding is None or face.kps is None:
            missing = "face.embedding" if face.embedding is None else "face.kps"
            raise ConfigError(f"{missing}: InstantID needs a face; give face.embedding=face.npy and face.kps=kps.json "
                              "(python -m onediffx.instantid.face writes both from a photo), or face.image with face.models_dir")
        _file("face.embedding", face.embedding, (".npy",), "a .npy file with the 512-d face embedding")
        _file("face.kps", face.kps, (".json",), "a .json file with the five face key points")
    from .face import face_from_config

    face_from_config(face)  # read (or detected) now, before gigabytes of weights load; kept for the run
