"""Plugin: onediff's compile backends ``oneflow`` and ``nexfort`` through ``onediff.infer_compiler``.

onediff's engines (OneFlow graphs, nexfort) predate current PyTorch and Python: they have no build
for this Python/torch, so onediffx's default is Inductor. Where they do import, this plugin makes
them selectable as ``compile.backend=oneflow`` / ``nexfort`` in the same stages and API; where
they do not, selecting them fails at assembly with one line saying so.

    python -m onediffx run plugins=[onediff] compile.backend=oneflow
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from onediffx.errors import NotAvailableError
from onediffx.registry import register_backend

PACKAGES = {"oneflow": ("onediff", "oneflow"), "nexfort": ("onediff", "nexfort")}


def _require(backend: str) -> Any:
    for package in PACKAGES[backend]:
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise NotAvailableError(
                f"compile.backend={backend}: the {package!r} package does not import ({err}); onediff's engines have "
                "no build for this Python/torch, use compile=inductor (the default engine)"
            ) from None
    from onediff.infer_compiler import compile as onediff_compile

    return onediff_compile


def _make(backend: str):
    def compile_with_onediff(module: nn.Module, name: str, options: Any, on_miss: str = "compile") -> None:
        onediff_compile = _require(backend)
        compiled = onediff_compile(module, backend=backend)
        module.forward = compiled.forward  # keep the module object the pipeline holds
        return None

    compile_with_onediff.__doc__ = f"onediff's {backend} engine via onediff.infer_compiler (optional packages)."
    compile_with_onediff.check = lambda: _require(backend)  # the compile stage calls it before loading
    return compile_with_onediff


for _backend in PACKAGES:
    register_backend(_backend)(_make(_backend))
