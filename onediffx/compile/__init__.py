"""Compilation: backends by name, ``compile_pipe`` / ``save_pipe`` / ``load_pipe``."""

from . import backends  # noqa: F401  (registers the built-in backends)
from .pipe import compile_options, compile_pipe, compile_state, load_pipe, save_pipe

__all__ = ["compile_options", "compile_pipe", "compile_state", "load_pipe", "save_pipe"]
