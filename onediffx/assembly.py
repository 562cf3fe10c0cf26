"""``Assembly``: one pipeline being assembled by the stages, and what they learned on the way.

Stages talk to each other and to the commands only through these named fields and hooks, so a
reader can find who sets ``graph_hit`` or who runs before every call without searching for
string keys. Commands call ``before_call()`` and ``after_call()`` (through ``generate``) and ``close()`` (when done),
and never need to know which stage asked for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from omegaconf import DictConfig

if TYPE_CHECKING:  # for the annotations only: building the stage registry should not import torch
    import torch

Hook = Callable[["Assembly"], None]


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
    compiled: list[str] = field(default_factory=list)
    """Components the ``compile`` stage compiled (empty: the pipeline runs eager)."""
    graph_hit: Optional[bool] = None
    """Whether ``load-graph`` found every compiled graph in the cache (``None``: not consulted)."""
    hit_check: Any = None
    """After a hit, ``load-graph``'s check that the first call compiled nothing (``stages.graph_cache``)."""
    progressive: Any = None
    """The background compile of ``compile.progressive`` while it is in flight (``stages.progressive``)."""
    stages: tuple[str, ...] = ()
    """The planned stage names, in order (``resolver.plan``): listed, whether enabled or not."""
    _before_call: list[Hook] = field(default_factory=list, repr=False)
    _after_call: list[Hook] = field(default_factory=list, repr=False)
    _on_close: list[Hook] = field(default_factory=list, repr=False)
    _closed: bool = field(default=False, repr=False)

    def planned(self, stage: str) -> bool:
        """Whether ``stage`` is in this assembly's plan: a stage asks this rather than reading ``cfg.stages``."""
        return stage in self.stages

    def note(self, stage: str, **facts: Any) -> None:
        """Record facts about a stage for metrics.json."""
        self.report.setdefault(stage, {}).update(facts)

    def add_before_call(self, hook: Hook) -> None:
        """Run ``hook(asm)`` before every generation call (e.g. switch to graphs that have landed)."""
        self._before_call.append(hook)

    def add_after_call(self, hook: Hook) -> None:
        """Run ``hook(asm)`` after every generation call (e.g. save graphs the call compiled)."""
        self._after_call.append(hook)

    def add_on_close(self, hook: Hook) -> None:
        """Run ``hook(asm)`` once when the command is done with the pipeline (e.g. reap a process)."""
        self._on_close.append(hook)

    def before_call(self) -> None:
        for hook in list(self._before_call):
            hook(self)

    def after_call(self) -> None:
        for hook in list(self._after_call):
            hook(self)

    def close(self) -> None:
        """Run the on-close hooks, once, in the order they were added."""
        if self._closed:
            return
        self._closed = True
        for hook in self._on_close:
            hook(self)
