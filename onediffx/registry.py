"""Name → implementation tables that configs select from.

YAML never names Python to import; it names entries in these tables. Built-in stages and backends
register on import of ``onediffx.stages`` and ``onediffx.compile``; plugins add their own through
the same decorators (see ``onediffx.plugins``).
"""

from __future__ import annotations

from typing import Callable, Type, TypeVar

from .errors import ConfigError

T = TypeVar("T")

STAGES: dict[str, type] = {}
BACKENDS: dict[str, Callable] = {}


def register_stage(name: str) -> Callable[[Type[T]], Type[T]]:
    """Class decorator: make a ``Stage`` subclass selectable as ``stages: [name]``."""

    def wrap(cls: Type[T]) -> Type[T]:
        if name in STAGES and STAGES[name] is not cls:
            raise ValueError(f"stage {name!r} is already registered by {STAGES[name].__module__}")
        cls.name = name
        STAGES[name] = cls
        return cls

    return wrap


def register_backend(name: str) -> Callable[[T], T]:
    """Decorator: make a compile backend selectable as ``compile.backend=name``."""

    def wrap(fn: T) -> T:
        BACKENDS[name] = fn
        return fn

    return wrap


def _lookup(table: dict, kind: str, key: str, name: str):
    if name not in table:
        from .plugin_loader import load_all_plugins

        load_all_plugins()
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise ConfigError(f"{key}: unknown {kind} {name!r}; known {kind}s: {known} (plugins add more)")
    return table[name]


def get_stage(name: str, key: str = "stages"):
    """The stage class registered as ``name``; a ``ConfigError`` naming the known ones if none."""
    return _lookup(STAGES, "stage", key, name)


def get_backend(name: str, key: str = "compile.backend"):
    """The compile backend registered as ``name``."""
    return _lookup(BACKENDS, "compile backend", key, name)
