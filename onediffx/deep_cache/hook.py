"""DeepCache on a UNet, as hooks: no UNet or pipeline code is copied.

Two kinds of hook, both on the unchanged diffusers modules:

* ``ReplayHook`` (a diffusers ``ModelHook``) on each module that a shallow step must not compute.
  During a full pass it records the module's output; during a shallow pass it returns the recorded
  output instead of running. Everything else in ``UNet.forward`` (embeddings, ControlNet residuals,
  the shallow blocks) runs as diffusers wrote it.
* ``DeepCache``, which replaces ``unet.forward`` with a dispatcher that counts steps and calls one
  of two passes: ``full_pass(args, kwargs) -> (output, features)`` and
  ``shallow_pass(features, args, kwargs) -> output``. The recorded features travel as plain
  arguments and return values, never as state the passes read or write.

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
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from .layout import replay_plan
from .schedule import SCHEDULES, full_steps

HOOK_NAME = "onediffx_deep_cache"


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


class DeepCache:
    """DeepCache state of one UNet: its replay hooks, its dispatcher and the per-call step counter.

    Hooks stay installed between pipeline calls (``start``/``stop`` only arm and disarm them) so that
    compiled passes keep seeing the same modules and functions; ``detach`` removes everything.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.tape = Tape()
        self.skip_index: Optional[int] = None
        self.schedule: Optional[Schedule] = None
        self.num_steps: Optional[Callable[[], Optional[int]]] = None
        self.step = 0
        self.features: Optional[dict[str, Any]] = None
        self._full: Optional[frozenset[int]] = None
        self._inner_forward: Optional[Callable[..., Any]] = None
        self._own_forward: Optional[Callable[..., Any]] = None
        self._hooked: list[nn.Module] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def of(cls, unet: nn.Module) -> "DeepCache":
        """The ``DeepCache`` attached to ``unet``, created (not yet configured) on first use."""
        state = unet.__dict__.get("_onediffx_deep_cache")
        if state is None:
            state = cls(unet)
            unet.__dict__["_onediffx_deep_cache"] = state
        return state

    def configure(self, skip_index: int) -> None:
        """Install the hooks for branch ``skip_index`` (a no-op when they already are)."""
        if skip_index == self.skip_index:
            return
        self._remove_replay_hooks()
        for key, module in replay_plan(self.unet, skip_index):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(ReplayHook(key, self.tape), HOOK_NAME)
            self._hooked.append(module)
        if self._inner_forward is None:
            current = self.unet.__dict__.get("forward")
            if hasattr(current, "release"):  # onediffx's ahead-of-time graphs cannot see replay hooks
                current.release()
            self._own_forward = self.unet.__dict__.get("forward")
            self._inner_forward = self.unet.forward
            self.unet.forward = self._dispatch
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
        from ..compile.cuda_graphs import PASS_GRAPHS, CudaGraphs

        if PASS_GRAPHS not in self.unet.__dict__ or "full_pass" in self.__dict__:
            return
        compile_kwargs = self.unet.__dict__[PASS_GRAPHS]
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
        """Remove every hook and restore ``unet.forward``."""
        self.stop()
        self._remove_replay_hooks()
        if self._inner_forward is not None:
            if self._own_forward is None:
                self.unet.__dict__.pop("forward", None)
            else:
                self.unet.forward = self._own_forward
            self._inner_forward = self._own_forward = None
        self.skip_index = None
        self.__dict__.pop("full_pass", None)
        self.__dict__.pop("shallow_pass", None)
        self.unet.__dict__.pop("_onediffx_deep_cache", None)

    def _remove_replay_hooks(self) -> None:
        for module in self._hooked:
            module._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
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

    @torch.compiler.disable(recursive=False)
    def _dispatch(self, *args: Any, **kwargs: Any) -> Any:
        if self.schedule is None:
            return self._inner_forward(*args, **kwargs)
        step = self.step
        self.step += 1
        if self.features is None or self._is_full_step(step):
            out, self.features = self.full_pass(args, kwargs)
            return out
        return self.shallow_pass(self.features, args, kwargs)

    def full_pass(self, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
        """The UNet as diffusers runs it, also returning the outputs a shallow pass will replay."""
        self.tape.record = {}
        out = self._inner_forward(*args, **kwargs)
        features = self.tape.record
        self.tape.record = None
        return out, features

    def shallow_pass(self, features: dict[str, Any], args: tuple, kwargs: dict) -> Any:
        """The UNet with the deep modules replaced by ``features`` from the last full pass."""
        self.tape.replay = features
        out = self._inner_forward(*args, **kwargs)
        self.tape.replay = None
        return out
