"""Compilation: backends by name, ``compile_pipe`` / ``save_pipe`` / ``load_pipe``, ``compile_options``.

Attributes load on first use; ``CompileConfig`` (``compile.config``) imports nothing heavy, so the
config schema can use it without importing torch. Built-in backends register when
``onediffx.compile.backends`` is imported (``compile_pipe`` does).
"""

from ..lazy_exports import lazy_getattr

_EXPORTS = {
    "CompileConfig": "config", "Graph": "config", "OnMiss": "config", "VaeDtype": "config",
    "CompileOptions": "options", "IgnoredCompileOptionWarning": "options", "compile_options": "options",
    "compile_pipe": "pipe", "compile_state": "pipe", "load_pipe": "pipe", "save_pipe": "pipe",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
