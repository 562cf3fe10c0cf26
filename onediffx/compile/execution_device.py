"""A compiled pipeline's execution device, looked up once instead of at every call.

diffusers' ``DiffusionPipeline._execution_device`` searches every module of every component for
offloading hooks each time it is read, and every pipeline reads it at the start of each call:
10 ms for SDXL's 2,800 modules on a 2-core host, before the first kernel, while the GPU waits.
``compile_pipe`` reads it once and pins the answer on the pipeline. The pin goes when the pipeline
moves (``to``), when offloading is turned on, or when compiling is undone (``restore_eager``);
diffusers' own lookup answers again until the next ``compile_pipe``.

The pinned value is read by a subclass with the pipeline's own name (``mixins.with_mixin``, as
DeepCache's and InstantID's pipelines are made).
"""

from __future__ import annotations

from typing import Any

import torch

from ..mixins import with_mixin
from ..state import EXECUTION_DEVICE


class PinnedDeviceMixin:
    """``_execution_device`` answers from the pin when there is one, else as diffusers does."""

    @property
    def _execution_device(self) -> torch.device:
        pinned = EXECUTION_DEVICE.get(self)
        return pinned if pinned is not None else super()._execution_device

    def to(self, *args: Any, **kwargs: Any) -> Any:
        unpin_execution_device(self)
        return super().to(*args, **kwargs)

    def enable_model_cpu_offload(self, *args: Any, **kwargs: Any) -> Any:
        unpin_execution_device(self)
        return super().enable_model_cpu_offload(*args, **kwargs)

    def enable_sequential_cpu_offload(self, *args: Any, **kwargs: Any) -> Any:
        unpin_execution_device(self)
        return super().enable_sequential_cpu_offload(*args, **kwargs)


def pin_execution_device(pipe: Any) -> None:
    """Answer ``pipe._execution_device`` from now on with what diffusers answers now."""
    if not hasattr(type(pipe), "_execution_device"):
        return  # not a diffusers pipeline: nothing to pin
    unpin_execution_device(pipe)
    device = pipe._execution_device
    object.__setattr__(pipe, "__class__", with_mixin(PinnedDeviceMixin, type(pipe), "with a pinned execution device"))
    EXECUTION_DEVICE.set(pipe, device)


def unpin_execution_device(pipe: Any) -> None:
    EXECUTION_DEVICE.clear(pipe)
