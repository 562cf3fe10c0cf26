"""``CompiledForward``: a module's forward, compiled ahead of time once per input signature.

It becomes the module's forward through a named hook (``CompiledHook``, ``hooks.COMPILED``), so
the module object, its class and its parameters stay what diffusers and the user hold:
``load_state_dict`` or in-place LoRA fusing reaches the compiled graph (parameters are graph
inputs, read at each call), and nothing recompiles. Each entry is one Dynamo graph captured with ``aot_compile`` and compiled by Inductor;
entries serialize (``torch.compiler.load_compiled_function``), which is what lets a new process
skip Dynamo tracing and Inductor entirely. A call whose inputs match no entry (a new resolution)
compiles one more entry, or runs eagerly when told to, and says so once.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..hooks import COMPILED, ForwardHook, add_hook, remove_hook
from .attention import attention_priority
from .guard_scope import prepare_guard_scope
from .guards import dispatch_key, portable_guards

log = logging.getLogger(__name__)


def module_forward(module: nn.Module) -> Callable[..., Any]:
    """The undecorated ``forward`` function of the module's class (``self`` as first argument).

    diffusers wraps some forwards (``apply_lora_scale``); the wrapper only scales PEFT LoRA layers,
    which onediffx never installs, and it cannot be serialized by reference.
    """
    return inspect.unwrap(type(module).forward)


def signature_of(args: tuple, kwargs: dict) -> list[Any]:
    """A readable summary of the tensor shapes and dtypes of a call, for manifests and messages."""

    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return [list(value.shape), str(value.dtype).replace("torch.", "")]
        if isinstance(value, dict):
            return {k: describe(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [describe(v) for v in value]
        return value if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__

    return describe([list(args), kwargs])


def _portable(signature: Any) -> Any:
    """The signature as it reads back from a manifest (JSON has lists, not tuples)."""
    return json.loads(json.dumps(signature))


class CompiledForward:
    """Drop-in ``forward`` that dispatches among AOT-compiled graphs by an exact key of the call.

    A graph compiled here is filed under the call's ``dispatch_key``. A graph loaded from the cache
    is filed at the first call whose readable signature equals the one it was saved with and
    whose inputs pass its (portable) guards; from then on dispatch is one dictionary lookup.
    """

    def __init__(
        self,
        module: nn.Module,
        compile_kwargs: dict[str, Any],
        on_miss: str = "compile",
        name: str = "",
        attention: str = "default",
    ) -> None:
        self.module = module
        self.name = name or type(module).__name__
        self.impl = module_forward(module)
        self.compile_kwargs = compile_kwargs
        self.on_miss = on_miss
        self.attention = attention
        """``compile.attention``: the attention-kernel priority graphs are traced under."""
        self.entries: list[Any] = []
        self.signatures: list[list[Any]] = []
        self.by_key: dict[tuple, Any] = {}
        self.unbound: list[tuple[Any, Any]] = []
        """Loaded (entry, signature) pairs not yet filed under a dispatch key."""
        self.compiles = 0
        """Graphs compiled in this process (loaded ones are not counted)."""
        self.compile_seconds: list[float] = []
        """Wall time of each of those compilations (Dynamo, AOTAutograd, Inductor, Triton)."""
        self.dirty = False
        """True when an entry was compiled since the last save."""
        self._warned: set[str] = set()
        self.on_release: Optional[Callable[["CompiledForward"], None]] = None

    def __reduce__(self):
        # Dynamo pickles the module's attributes into a saved graph's guard state; this object
        # (which holds other graphs' guard managers) is reached through ``module.forward`` (its
        # hook) and is not part of any guard, so it pickles as a marker.
        return (str, (f"<onediffx CompiledForward of {self.name}>",))

    def install(self, module: Optional[nn.Module] = None) -> "CompiledHook":
        """Make these graphs ``module``'s forward (this one's module by default) through its named hook."""
        return add_hook(module if module is not None else self.module, CompiledHook(self, module))

    def release(self) -> None:
        """Hand the module back to Dynamo's usual path (``module.compile``) with the same options.

        Needed when something wraps submodule forwards after compiling (DeepCache's replay
        hooks): ahead-of-time graphs inlined the old forwards and would never see the hooks,
        whereas Dynamo traces them.
        """
        self.to_dynamo(self.module)
        if self.on_release is not None:
            self.on_release(self)

    def to_dynamo(self, module: nn.Module) -> None:
        """Unhook ``module`` and compile it by Dynamo's usual path, with these graphs' options."""
        remove_hook(module, COMPILED)
        kwargs = {k: v for k, v in self.compile_kwargs.items() if k != "fullgraph"}
        module.compile(fullgraph=True, **kwargs)

    # -- calling ---------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(self.module, args, kwargs)

    def call(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Run ``module``'s forward through these graphs: ``module`` is this one's, or a block of the
        same structure sharing them (regional compilation; see ``regions.py``)."""
        key = dispatch_key(module, args, kwargs)
        entry = self.by_key.get(key) or self._bind(key, module, args, kwargs)
        if entry is None:
            if self.on_miss == "eager" and self.entries:
                self._say_once("eager", f"{self.name}: input {signature_of(args, kwargs)} was not prepared; running eager")
                return self.impl(module, *args, **kwargs)
            entry = self._compile(module, args, kwargs)
            self.by_key[key] = entry
        return entry(module, *args, **kwargs)

    def _bind(self, key: tuple, module: nn.Module, args: tuple, kwargs: dict) -> Optional[Any]:
        """File a loaded graph under this call's key if it was saved for exactly this call."""
        if not self.unbound:
            return None
        signature = _portable(signature_of(args, kwargs))
        for i, (entry, saved) in enumerate(self.unbound):
            if saved == signature and entry.guard_check(module, *args, **kwargs):
                del self.unbound[i]
                self.by_key[key] = entry
                return entry
        return None

    def _compile(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.entries:
            self._say_once(str(len(self.entries)), f"{self.name}: compiling a graph for new input {signature_of(args, kwargs)}")
        if hasattr(torch._dynamo.config, "enable_aot_compile"):  # torch 2.11 gates the API behind it
            torch._dynamo.config.enable_aot_compile = True
        options = {**self.compile_kwargs.get("options", {}), "guard_filter_fn": portable_guards}
        compiled = torch.compile(self.impl, **{**self.compile_kwargs, "options": options, "fullgraph": True})
        start = time.perf_counter()
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        prepare_guard_scope()
        with torch.no_grad(), attention_priority(self.attention, device):
            entry = compiled.aot_compile(((module, *args), kwargs))
        self.compile_seconds.append(round(time.perf_counter() - start, 2))
        log.info("%s: compiled a graph for %s in %.1f s", self.name, signature_of(args, kwargs), self.compile_seconds[-1])
        entry.disable_guard_check()  # dispatch checked the call; the entry need not check again
        self.entries.append(entry)
        self.signatures.append(signature_of(args, kwargs))
        self.compiles += 1
        self.dirty = True
        return entry

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # -- persistence -------------------------------------------------------------------------------

    def serialize(self) -> list[bytes]:
        """One blob per compiled graph, for the graph cache."""
        return [type(e).serialize(e, {"forward": self.impl}).serialized_data for e in self.entries]

    def load(self, blobs: list[bytes], signatures: list[list[Any]]) -> None:
        """Add graphs saved by ``serialize`` (in any process with the same key)."""
        from torch.compiler import load_compiled_function

        for blob, signature in zip(blobs, signatures):
            prepare_guard_scope()
            entry = load_compiled_function(io.BytesIO(blob), external_data={"forward": self.impl})
            entry.disable_guard_check()
            self.entries.append(entry)
            self.signatures.append(signature)
            self.unbound.append((entry, _portable(signature)))


class CompiledHook(ForwardHook):
    """``module``'s forward as a named hook: the graphs of ``compiled``, called with ``module``.

    ``module`` is ``compiled``'s own module, or (regional compilation) a block of the same structure
    sharing its graphs. One call, no wrapper frames: regions put this on every block.
    """

    hook_name = COMPILED

    def __init__(self, compiled: CompiledForward, module: Optional[nn.Module] = None) -> None:
        super().__init__(module if module is not None else compiled.module)
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled.call(self.module, args, kwargs)

    def __reduce__(self):
        # Dynamo pickles a module's callable attributes (its ``forward``: this hook) into a saved
        # graph's guard state; no guard reads the hook, so it pickles as a marker.
        return (str, (f"<onediffx compiled hook of {self.compiled.name}>",))

    def release(self) -> None:
        """Hand the module to Dynamo's usual path (see ``CompiledForward.release``)."""
        if self.module is self.compiled.module:
            self.compiled.release()
        else:  # a region block sharing another block's graphs: the group stays saveable
            self.compiled.to_dynamo(self.module)
