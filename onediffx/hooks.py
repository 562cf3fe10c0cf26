"""onediffx's forward changes as named hooks in diffusers' ``HookRegistry``.

Compiling, CUDA graphs and DeepCache each change a module's forward. Each does it as a hook
registered by name in the module's ``HookRegistry`` (``module._diffusers_hook``, as diffusers' own
``hooks/`` do), so that one capability finds another by asking the registry (``has_hook``) and
undoes its own change by name (``remove_hook``), without knowing what else sits on the module.

Hooks stack in registration order: the last one registered is the outermost, the first to run,
and each ``ForwardHook`` calls the forward underneath it (``inner``). Compile's hooks on one
module, outermost first: CUDA graphs, then the compiled forward. DeepCache's dispatcher goes on
after compiling and releases those two first (``release_ahead_of_time``).

One departure from the registry's own wrapping, in ``add_hook``: the registry installs a generic
wrapper (``pre_forward``, then the hook, then ``post_forward``, in a Python closure) as the module's
forward. Our hooks have no pre or post step, so the hook object itself becomes the forward:

* Dynamo must skip DeepCache's dispatcher frame (its step counter is the only per-step Python state)
  and compile each pass as its own graph. The registry's wrapper frame is traced by Dynamo, and a
  ``torch.compiler.disable``d call inside a traced frame is an error under ``fullgraph=True``.
* Regional compilation puts a hook on about a hundred blocks, each called at every step: one call
  instead of four Python frames per block.

The hook stays registered (named, ordered, removable) exactly as ``register_hook`` made it.

Saved ahead-of-time graphs are unaffected: Dynamo pickles a module's callable attributes (its
``forward``, now a hook) into a saved graph's guard state, and compile's hooks pickle as markers
(their ``__reduce__``), as ``CompiledForward`` does; the registry is not callable and is left out.
(Checked also with the registry's own wrapper as the forward: saving and loading work there too.)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

COMPILED = "onediffx_compiled"
"""The module's forward runs ahead-of-time compiled graphs (a whole component, or one region block)."""
CUDA_GRAPHS = "onediffx_cuda_graphs"
"""The module's forward replays CUDA graphs of the forward underneath."""
DEEP_CACHE_DISPATCH = "onediffx_deep_cache_dispatch"
"""The UNet's forward is DeepCache's step dispatcher (full or shallow pass)."""
DEEP_CACHE_REPLAY = "onediffx_deep_cache"
"""A module that DeepCache's shallow passes replay from the last full pass."""

AHEAD_OF_TIME = (CUDA_GRAPHS, COMPILED)
"""Compile's hooks, outermost first: forwards prepared ahead of time, blind to hooks added later below them."""


class ForwardHook(ModelHook):
    """A named hook that is its module's whole forward: no pre or post step, called directly.

    Subclasses set ``hook_name`` and define ``__call__(*args, **kwargs)``; ``inner`` is the forward
    underneath (the class's own, or the next hook's).
    """

    hook_name: str = ""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    @property
    def inner(self) -> Callable[..., Any]:
        """The forward this hook wraps, as the registry recorded it at registration."""
        return self.fn_ref.original_forward

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Only reached through the registry's own wrapper (``add_hook`` bypasses it).
        return self(*args, **kwargs)

    def release(self) -> None:
        """Take this hook off its module (subclasses also hand the module to what replaces them)."""
        remove_hook(self.module, self.hook_name)


def hook_registry(module: nn.Module) -> Optional[HookRegistry]:
    """The module's ``HookRegistry``, or ``None`` when no hook was ever registered on it."""
    return getattr(module, "_diffusers_hook", None)


def get_hook(module: nn.Module, name: str) -> Optional[ModelHook]:
    """The hook registered on ``module`` under ``name``, if any."""
    found = hook_registry(module)
    return None if found is None else found.get_hook(name)


def has_hook(module: nn.Module, name: str) -> bool:
    """Whether a hook is registered on ``module`` under ``name``."""
    return get_hook(module, name) is not None


def add_hook(module: nn.Module, hook: ModelHook, name: Optional[str] = None) -> ModelHook:
    """Register ``hook`` on ``module`` (a ``ForwardHook`` under its ``hook_name``) and return it.

    A ``ForwardHook`` then replaces the registry's generic wrapper as the module's forward (see
    the module docstring for why); other hooks keep the registry's wrapper.
    """
    name = name or getattr(hook, "hook_name", "")
    if not name:
        raise ValueError(f"add_hook: {type(hook).__name__} needs a name")
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    if isinstance(hook, ForwardHook):
        module.forward = hook
    return hook


def remove_hook(module: nn.Module, name: str) -> bool:
    """Remove the hook named ``name`` from ``module`` (not from its submodules); whether it was there.

    Hooks registered after it stay, in order. diffusers' ``remove_hook`` on a hook that is not the
    outermost would drop the ``new_forward`` of the hook above it (DeepCache's replay hook above a
    compiled region, say), so the hooks above are taken off and registered again.
    """
    found = hook_registry(module)
    if found is None or name not in found.hooks:
        return False
    names = list(found.hooks)  # registration order, innermost first
    above = [(other, found.hooks[other]) for other in names[names.index(name) + 1:]]
    for other, _ in reversed(above):
        found.remove_hook(other, recurse=False)
    found.remove_hook(name, recurse=False)
    for other, hook in above:
        add_hook(module, hook, other)
    _unpin_forward(module)
    return True


def release_ahead_of_time(module: nn.Module) -> None:
    """Release compile's hooks on ``module``, outermost first (each hands the module to what follows).

    For DeepCache: graphs compiled or captured ahead of time inlined the submodules' forwards as
    they were, so replay hooks added below them would never run.
    """
    for name in AHEAD_OF_TIME:
        hook = get_hook(module, name)
        if hook is not None:
            hook.release()


def _unpin_forward(module: nn.Module) -> None:
    """Drop the bound ``forward`` the registry leaves on the instance when its last hook goes.

    It is the class's own forward, pinned to the instance: left there, the module would look as if
    something still replaced its forward.
    """
    forward = module.__dict__.get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]
