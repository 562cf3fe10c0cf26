"""DeepCache on a UNet, as hooks: no UNet or pipeline code is copied.

Two kinds of hook, both on the unchanged diffusers modules:

* ``ReplayHook`` (a diffusers ``ModelHook``) on each module that a shallow step must not compute.
  During a full pass it records the module's output; during a shallow pass it returns the recorded
  output instead of running. Everything else in ``UNet.forward`` (embeddings, ControlNet residuals,
  the shallow blocks) runs as diffusers wrote it.
* ``DeepCache``, the UNet's dispatcher hook (``hooks.DEEP_CACHE_DISPATCH``): it counts steps and
  calls one of two passes over the forward underneath it: ``full_pass(args, kwargs) -> (output,
  features)`` and ``shallow_pass(features, args, kwargs) -> output``. The recorded features travel
  as plain arguments and return values, never as state the passes read or write.

Both are named hooks in diffusers' ``HookRegistry``: compiling asks the registry whether DeepCache
is on, and ``DeepCache.of(unet)`` is the dispatcher hook registered on the UNet.

Why the split: the dispatcher holds the only per-step Python state (the step counter), and it is
excluded from Dynamo (``torch.compiler.disable(recursive=False)``). So when the UNet is compiled
whole (``torch.compile(unet)`` or ``unet.compile()``, ``fullgraph`` included), Dynamo skips the
dispatcher frame and compiles each pass as its own frame: two graphs, each traced once, with the
cached features as graph inputs, and no recompilation from one step or one call to the next.

Parameters are never moved or wrapped, so in-place LoRA fusing keeps working while hooks are on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..hooks import (DEEP_CACHE_DISPATCH, DEEP_CACHE_REPLAY, ForwardHook, add_hook, get_hook, has_hook,
                     release_ahead_of_time, remove_hook)
from ..state import PASS_GRAPHS
from .layout import replay_plan
from .schedule import SCHEDULES, full_steps

HOOK_NAME = DEEP_CACHE_REPLAY


@dataclass(frozen=True)
class Schedule:
    """When to run the full UNet during one pipeline call."""

    interval: int = 3
    kind: str = "uniform"

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"cache_interval must be >= 1, got {self.interval}")
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown DeepCache schedule {self.kind!r}; known: {', '.join(SCHEDULES)}")


class Tape:
    """What the replay hooks of one UNet read and write during a pass (``None`` when idle)."""

    def __init__(self) -> None:
        self.record: Optional[dict[str, Any]] = None
        self.replay: Optional[dict[str, Any]] = None


class ReplayHook(ModelHook):
    """Record a module's output on full passes, return the recording on shallow ones."""

    def __init__(self, key: str, tape: Tape) -> None:
        super().__init__()
        self.key = key
        self.tape = tape

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        tape = self.tape
        if tape.replay is not None:
            return tape.replay[self.key]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if tape.record is not None:
            tape.record[self.key] = out
        return out


class DeepCache(ForwardHook):
    """DeepCache state of one UNet: its replay hooks, its dispatcher and the per-call step counter.

    The object is itself the dispatcher hook on the UNet (its ``__call__``). Hooks stay installed
    between pipeline calls (``start``/``stop`` only arm and disarm them) so that compiled passes keep
    seeing the same modules and functions; ``detach`` removes everything.
    """

    hook_name = DEEP_CACHE_DISPATCH

    def __init__(self, unet: nn.Module) -> None:
        super().__init__(unet)
        self.unet = unet
        self.tape = Tape()
        self.skip_index: Optional[int] = None
        self.schedule: Optional[Schedule] = None
        self.num_steps: Optional[Callable[[], Optional[int]]] = None
        self.step = 0
        self.features: Optional[dict[str, Any]] = None
        self._full: Optional[frozenset[int]] = None
        self._hooked: list[nn.Module] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def of(cls, unet: nn.Module) -> "DeepCache":
        """The ``DeepCache`` hooked on ``unet``, or a new one (not yet configured, so not yet hooked)."""
        state = get_hook(unet, DEEP_CACHE_DISPATCH)
        return state if state is not None else cls(unet)

    def configure(self, skip_index: int) -> None:
        """Install the hooks for branch ``skip_index`` (a no-op when they already are)."""
        if skip_index == self.skip_index:
            return
        self._remove_replay_hooks()
        for key, module in replay_plan(self.unet, skip_index):
            add_hook(module, ReplayHook(key, self.tape), HOOK_NAME)
            self._hooked.append(module)
        if not has_hook(self.unet, DEEP_CACHE_DISPATCH):
            release_ahead_of_time(self.unet)  # onediffx's ahead-of-time graphs cannot see replay hooks
            add_hook(self.unet, self)
        for graphs in (self.__dict__.get("full_pass"), self.__dict__.get("shallow_pass")):
            if graphs is not None:
                graphs.reset()  # captured with the old hook layout
        self.skip_index = skip_index

    def start(self, schedule: Schedule, num_steps: Optional[Callable[[], Optional[int]]] = None) -> None:
        """Arm for one pipeline call: step 0 will be a full step, whatever the last call left."""
        self._graph_passes()
        self.schedule, self.num_steps = schedule, num_steps
        self.step, self.features, self._full = 0, None, None

    def _graph_passes(self) -> None:
        """Capture each pass in CUDA graphs once the UNet is compiled with ``cuda_graphs``.

        Checked at every call because compiling may come after DeepCache was configured. The
        graph wrapper keeps Dynamo out of its own frame, so the passes it calls are compiled
        explicitly here rather than by the UNet's ``compile()``.
        """
        from ..cuda_graphs import CudaGraphs

        if not PASS_GRAPHS.has(self.unet) or "full_pass" in self.__dict__:
            return
        compile_kwargs = PASS_GRAPHS.get(self.unet)
        for name in ("full_pass", "shallow_pass"):
            fn = getattr(self, name)
            if compile_kwargs is not None:
                fn = torch.compile(fn, fullgraph=True, **compile_kwargs)
            setattr(self, name, CudaGraphs(fn, self.unet, f"unet (DeepCache {name.replace('_', ' ')})"))

    def stop(self) -> None:
        """Disarm: the UNet computes normally and holds no features until the next ``start``."""
        self.schedule, self.num_steps, self.features, self._full = None, None, None, None
        self.step = 0

    def detach(self) -> None:
        """Remove every hook: the UNet's forward is again the one underneath the dispatcher."""
        self.stop()
        self._remove_replay_hooks()
        remove_hook(self.unet, DEEP_CACHE_DISPATCH)
        self.skip_index = None
        self.__dict__.pop("full_pass", None)
        self.__dict__.pop("shallow_pass", None)

    def release(self) -> None:
        """As a hook taken off by name: the dispatcher never goes without its replay hooks."""
        self.detach()

    def _remove_replay_hooks(self) -> None:
        for module in self._hooked:
            remove_hook(module, HOOK_NAME)
        self._hooked = []

    # -- the passes -----------------------------------------------------------------------------

    def _is_full_step(self, step: int) -> bool:
        schedule = self.schedule
        if schedule.kind == "uniform":
            return step % schedule.interval == 0
        if self._full is None:
            total = self.num_steps() if self.num_steps is not None else None
            self._full = full_steps(total or step + 1, schedule.interval, schedule.kind)
        return step in self._full

    def next_is_full(self) -> bool:
        """Whether the UNet's next call runs the full pass (a ControlNet called just before may reuse
        its last residuals when not: ``onediffx.instantid``)."""
        return self.schedule is None or self.features is None or self._is_full_step(self.step)

    @torch.compiler.disable(recursive=False)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The UNet's forward while hooked: the forward underneath, or one of the two passes."""
        if self.schedule is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        step = self.step
        self.step += 1
        if self.features is None or self._is_full_step(step):
            out, self.features = self.full_pass(args, kwargs)
            return out
        return self.shallow_pass(self.features, args, kwargs)

    def full_pass(self, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
        """The UNet as diffusers runs it, also returning the outputs a shallow pass will replay."""
        self.tape.record = {}
        out = self.fn_ref.original_forward(*args, **kwargs)
        features = self.tape.record
        self.tape.record = None
        return out, features

    def shallow_pass(self, features: dict[str, Any], args: tuple, kwargs: dict) -> Any:
        """The UNet with the deep modules replaced by ``features`` from the last full pass."""
        self.tape.replay = features
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.tape.replay = None
        return out
