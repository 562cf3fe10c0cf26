"""Import the compiler while the weights load.

Reading the first saved graph needs Inductor, whose import takes seconds (it builds its
primitive ops with TorchScript) and depends on nothing in the model. It is therefore imported in
a thread beside the model load, where reading safetensors and copying weights to the device
leave the interpreter free most of the time:

* the CLI: ``assemble`` starts it before loading the model;
* the Python API: ``from onediffx import compile_pipe`` starts it, which in OneDiffX's usage comes
  before ``from_pretrained``, so a script restarting from ``load_pipe`` gets the same head start.

``compile_pipe`` and ``load_pipe`` wait for it before compiling anything, so the compiler's
modules are never imported by two threads at once.
"""

from __future__ import annotations

import importlib
import threading
from typing import Optional

MODULES = ("torch._inductor.compile_fx", "torch._dynamo.aot_compile", "torch._inductor.codecache")


class CompilerPreload:
    """A daemon thread importing ``MODULES``; ``wait()`` joins it and re-raises nothing.

    An import that fails here fails again, with its real traceback, where the stage imports it.
    """

    def __init__(self) -> None:
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="onediffx-compiler-preload", daemon=True)

    def _run(self) -> None:
        try:
            for name in MODULES:
                importlib.import_module(name)
        except BaseException as err:  # noqa: BLE001  (reported by the stage that needs the module)
            self.error = err

    def start(self) -> "CompilerPreload":
        self._thread.start()
        return self

    def wait(self) -> None:
        self._thread.join()


_STARTED: Optional[CompilerPreload] = None


def start() -> CompilerPreload:
    """Start the process-wide preload once (later calls return the same one)."""
    global _STARTED
    if _STARTED is None:
        _STARTED = CompilerPreload().start()
    return _STARTED


def wait() -> None:
    """Wait for the preload if one was started; a no-op otherwise."""
    if _STARTED is not None:
        _STARTED.wait()
