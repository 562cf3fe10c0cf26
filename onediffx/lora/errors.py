"""Errors of the LoRA engine.

Each names the LoRA (file, hub id or ``<state dict>``) and says what is wrong with it in one line.
They are raised before any weight is touched: a LoRA is read, converted and checked against the
pipeline completely, and only then fused.
"""

from __future__ import annotations

from ..errors import NotFoundError, OnediffxError

__all__ = ["LoraError", "LoraFormatError", "LoraMismatchError", "LoraNotFoundError"]


class LoraError(OnediffxError):
    """Base of the LoRA engine's user-facing errors."""


class LoraFormatError(LoraError):
    """The file is not a readable safetensors LoRA in a format onediffx understands."""


class LoraMismatchError(LoraError):
    """The LoRA is readable but does not fit this pipeline (other base model, unknown layers)."""


class LoraNotFoundError(LoraError, NotFoundError):
    """The LoRA source is not on this machine (file, folder, or hub id in the local HF cache)."""
