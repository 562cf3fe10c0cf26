"""The stage contract.

A stage is one named, ordered change to an assembled pipeline. It reads its own config group,
checks it before any weights load (so a typo costs nothing), and is a no-op when disabled.
Stages communicate through the ``Assembly`` they are given, never through globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from omegaconf import DictConfig


@dataclass
class Assembly:
    """A pipeline being assembled, and what stages learn about it on the way."""

    pipe: Any
    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments every generation call passes to the pipeline."""
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage facts that end up in metrics.json (cache hit, what was compiled, ...)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Scratch space shared between stages of one assembly (e.g. compile → save-graph)."""

    def note(self, stage: str, **facts: Any) -> None:
        """Record facts about a stage for metrics.json."""
        self.report.setdefault(stage, {}).update(facts)


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
