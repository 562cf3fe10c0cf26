"""``compile_options``: the options ``compile_pipe`` compiles with, in both of the forms users write.

A preset, for Python callers who want what the CLI's ``compile=<preset>`` means::

    compile_pipe(pipe, options=compile_options("inductor", fuse_qkv=False))   # -> CompileConfig

OneDiffX's mutable options object, so that its snippets run unchanged::

    compile_options.fuse_qkv = False                      # a CompileConfig field: applied
    compile_options.attention_allow_half_precision_score_accumulation_max_m = 0   # oneflow-only: ignored
    compile_pipe(pipe, options=compile_options)           # preset for the backend + the assignments

Semantics of the module-level ``compile_options`` object (chosen to match OneDiffX's, where it was
a process-wide mutable object): an assignment stays until ``compile_options.reset()``, and applies
to every ``compile_pipe`` call that passes the object as ``options=``. It never leaks anywhere
else: calling ``compile_options(...)`` and ``compile_pipe(pipe)`` without ``options`` still give
the bare preset. Code that wants no process-wide state makes its own ``CompileOptions()``.

Attributes that are not ``CompileConfig`` fields (OneDiffX's oneflow/nexfort knobs) have no meaning
for Inductor; they are ignored with one ``IgnoredCompileOptionWarning`` naming them, once per object
until ``reset()``, rather than failing a script that was written for OneDiffX.
"""

from __future__ import annotations

import warnings
from dataclasses import fields, replace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import CompileConfig
from ..errors import ConfigError

FIELDS = frozenset(f.name for f in fields(CompileConfig))


class IgnoredCompileOptionWarning(UserWarning):
    """An option was set that no onediffx backend reads (e.g. one of OneDiffX's oneflow knobs)."""


def preset_options(preset: str = "inductor", **overrides: Any) -> CompileConfig:
    """The options of a ``conf/compile/<preset>.yaml`` preset, with ``overrides``."""
    from ..presets import load_preset

    base = OmegaConf.merge(OmegaConf.structured(CompileConfig), load_preset("compile", preset))
    return replace(OmegaConf.to_object(base), **overrides)


def preset_for(backend: str) -> str:
    """The preset ``compile_pipe(pipe, backend)`` starts from: OneDiffX's default maps to ``inductor``."""
    return "none" if backend == "none" else "inductor"


class CompileOptions:
    """Callable for a preset (``compile_options("inductor", **overrides)``), and a record of assignments.

    Assignments are only recorded here; they are checked and merged over the backend's preset
    when ``compile_pipe`` resolves the object (``resolve``), so an assignment order or a field
    set before another cannot matter.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_assigned", {})
        object.__setattr__(self, "_warned", set())

    def __call__(self, preset: str = "inductor", **overrides: Any) -> CompileConfig:
        """The preset's options with ``overrides``; the recorded assignments play no part here."""
        return preset_options(preset, **overrides)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"compile_options: {name!r} is not an option")
        self._assigned[name] = value

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: an assigned value, or a field's value in the inductor preset.
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._assigned:
            return self._assigned[name]
        if name in FIELDS:
            return getattr(preset_options("inductor"), name)
        raise AttributeError(f"compile_options has no option {name!r} set; CompileConfig fields: {', '.join(sorted(FIELDS))}")

    def __delattr__(self, name: str) -> None:
        if name not in self._assigned:
            raise AttributeError(name)
        del self._assigned[name]

    def __repr__(self) -> str:
        return f"CompileOptions({', '.join(f'{k}={v!r}' for k, v in self._assigned.items())})"

    @property
    def assigned(self) -> dict[str, Any]:
        """What has been assigned since creation or the last ``reset()`` (a copy)."""
        return dict(self._assigned)

    def reset(self) -> None:
        """Forget every assignment (and which ignored names were warned about)."""
        self._assigned.clear()
        self._warned.clear()

    def resolve(self, backend: str = "inductor", *, stacklevel: int = 2) -> CompileConfig:
        """The backend's preset with the assigned ``CompileConfig`` fields merged (type-checked).

        Assigned names that are not fields are left out, with one warning naming those not
        warned about before; ``stacklevel`` is ``warnings.warn``'s, counted from this method
        (2: its caller), so the warning points at the user's ``compile_pipe`` line.
        """
        known = {k: v for k, v in self._assigned.items() if k in FIELDS}
        ignored = sorted(k for k in self._assigned if k not in FIELDS and k not in self._warned)
        if ignored:
            self._warned.update(ignored)
            warnings.warn(
                f"compile_options: ignored {', '.join(ignored)} (not read by onediffx's compile backends; "
                f"OneDiffX's oneflow/nexfort options have no Inductor equivalent). "
                f"Options that apply: {', '.join(sorted(FIELDS))}",
                IgnoredCompileOptionWarning, stacklevel=stacklevel,
            )
        base = OmegaConf.structured(preset_options(preset_for(backend)))
        try:
            return OmegaConf.to_object(OmegaConf.merge(base, known))
        except OmegaConfBaseException as err:  # a wrong type: name the option, as config errors do
            raise ConfigError(f"compile_options.{err.key}: {err.msg}".splitlines()[0]) from err


compile_options = CompileOptions()
"""The process-wide options object of OneDiffX's API (see the module docstring for its semantics)."""


def as_options(options: Any, backend: str, *, stacklevel: int = 2) -> CompileConfig:
    """Whatever a caller passed as ``compile_pipe(options=...)``, as a ``CompileConfig``.

    ``None``: the backend's preset; a ``CompileOptions``: the preset with its assignments; a dict
    or config node: ``CompileConfig`` fields (unknown keys and wrong types fail, with the key).
    """
    if options is None:
        return preset_options(preset_for(backend))
    if isinstance(options, CompileConfig):
        return options
    if isinstance(options, CompileOptions):
        return options.resolve(backend, stacklevel=stacklevel + 1)
    if isinstance(options, (dict, DictConfig)):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CompileConfig), options))
    raise TypeError("compile_pipe: options must be a CompileConfig, compile_options (or a CompileOptions), "
                    f"a dict or None, not {type(options).__name__}")
