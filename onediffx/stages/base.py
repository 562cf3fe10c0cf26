"""The stage contract.

A stage is one named, ordered change to an assembled pipeline. It reads its own config group,
checks it before any weights load (so a typo costs nothing), and is a no-op when disabled.
Stages communicate through the ``Assembly`` they are given (``onediffx.assembly``), never through globals.
"""

from __future__ import annotations

from typing import ClassVar, Optional

from omegaconf import DictConfig

from ..assembly import Assembly


class Stage:
    """Base class of registered stages; subclasses set ``group`` and override what they need."""

    name: ClassVar[str] = ""
    group: ClassVar[Optional[str]] = None
    """Top-level config key this stage reads (``None`` if it reads none)."""

    def check(self, cfg: DictConfig) -> None:
        """Validate this stage's config before the model loads; raise ``ConfigError``."""

    def enabled(self, asm: Assembly) -> bool:
        """Whether ``apply`` has anything to do for this config."""
        return True

    def apply(self, asm: Assembly) -> None:
        """Change ``asm.pipe`` (in place or by replacing it)."""
        raise NotImplementedError


__all__ = ["Assembly", "Stage"]
