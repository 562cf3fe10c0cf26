"""How far quantization moved the output: PSNR and SSIM of images, relative error of one UNet output.

Measured against the same pipeline unquantized, same seed. On random (synthetic) weights these
numbers say little about real checkpoints: activations of random weights lack the outliers that
make real models sensitive, so quote them as a check that nothing broke, not as a quality claim.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn


def image_fidelity(reference: Any, test: Any) -> tuple[float, Optional[float]]:
    """(PSNR in dB, SSIM) of ``test`` against ``reference`` (PIL images or HxWx3 uint8 arrays).

    scikit-image's metrics, as the sweep summary uses; PSNR is infinite for identical images.
    Without scikit-image (a bare GPU host) PSNR is computed directly and SSIM is ``None``.
    """
    a = np.asarray(reference.convert("RGB") if hasattr(reference, "convert") else reference)
    b = np.asarray(test.convert("RGB") if hasattr(test, "convert") else test)
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError:
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        return (float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))), None
    with np.errstate(divide="ignore"):
        psnr = float(peak_signal_noise_ratio(a, b, data_range=255))
    win = min(7, *a.shape[:2])
    win -= 1 - win % 2  # odd, as SSIM's window must be
    ssim = float(structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=win))
    return psnr, ssim


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    """``||test - reference|| / ||reference||`` in float32."""
    ref = reference.detach().float()
    return float((test.detach().float() - ref).norm() / ref.norm().clamp_min(1e-12))


def _first(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first(output[0])
    return output.sample if hasattr(output, "sample") else output[0]


@dataclass
class Captured:
    """The first call of a module: its inputs (on the CPU) and its output."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: Optional[torch.Tensor] = None


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


@contextmanager
def capture_first_call(module: nn.Module) -> Iterator[Captured]:
    """Record the inputs and output of ``module``'s first call inside the block (hooks removed after)."""
    captured = Captured()

    def before(_: nn.Module, args: tuple, kwargs: dict) -> None:
        if captured.output is None and not captured.args:
            captured.args, captured.kwargs = _detach(args), _detach(kwargs)

    def after(_: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if captured.output is None:
            captured.output = _first(output).detach().clone()

    handles = [module.register_forward_pre_hook(before, with_kwargs=True),
               module.register_forward_hook(after, with_kwargs=True)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def output_error(module: nn.Module, captured: Captured) -> Optional[float]:
    """Relative error of ``module`` now on the captured inputs, against the captured output."""
    if captured.output is None:
        return None
    dtype = next(module.parameters()).dtype  # fp8 converted the pipeline to bfloat16 since the capture

    def cast(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(cast(v) for v in value)
        return value

    return relative_error(_first(module(*cast(captured.args), **cast(captured.kwargs))), captured.output)
