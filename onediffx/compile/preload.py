"""Import the compiler while the weights load.

Reading the first saved graph needs Inductor, whose import takes about a second (it builds its
primitive ops with TorchScript) and depends on nothing in the model. ``assemble`` therefore
imports it in a thread beside the model load, where reading safetensors and copying weights to
the device leave the interpreter free most of the time, and waits for it before the first stage,
so that no module is ever imported by two threads at once.
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
