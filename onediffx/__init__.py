"""onediffx: declarative, fast Hugging Face diffusers pipelines.

The Python API kept from OneDiffX: ``compile_pipe``, ``save_pipe``, ``load_pipe``,
``compile_options`` (callable for a preset, or OneDiffX's mutable options object);
``onediffx.lora``; ``onediffx.deep_cache``; ``quantize_pipe`` (fp8/int8 through torchao).
"""

__version__ = "0.1.0"


import importlib
from typing import Any

_COMPILE_API = ("compile_pipe", "save_pipe", "load_pipe", "compile_options", "compile_state", "CompileOptions")


def __getattr__(name: str) -> Any:
    # Lazy: `python -m onediffx list` and config errors should not pay for importing torch.compile.
    if name == "quantize_pipe":
        return importlib.import_module("onediffx.quantize.pipe").quantize_pipe
    if name not in _COMPILE_API:
        raise AttributeError(f"module 'onediffx' has no attribute {name!r}")
    from .compile import preload
    from .requirements import check

    check()  # an old torch or diffusers: one line naming it, not an error deep inside a compile

    preload.start()  # Inductor's import overlaps the weight loading that follows in a user's script
    return getattr(importlib.import_module("onediffx.compile"), name)
