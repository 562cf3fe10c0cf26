"""Pipeline classes with a capability mixed in, under the pipeline's own name.

DeepCache, InstantID and the compiled pipeline's pinned execution device each change how a diffusers
pipeline behaves by giving the instance a subclass with a mixin in front. The subclass keeps the
base's name so that ``save_pretrained`` writes a ``model_index.json`` plain diffusers loads, and is
made once per (mixin, base) pair so that instances of one pipeline share one class.
"""

from __future__ import annotations

_MADE: dict[tuple[type, type], type] = {}


def with_mixin(mixin: type, base: type, what: str) -> type:
    """``base`` with ``mixin`` in front and ``base``'s name; ``base`` itself when it has the mixin already.

    ``what`` finishes the class's docstring after the base's full name ("with DeepCache call arguments").
    """
    if issubclass(base, mixin):
        return base
    if (mixin, base) not in _MADE:
        doc = f"``{base.__module__}.{base.__name__}`` {what}."
        _MADE[mixin, base] = type(base.__name__, (mixin, base), {"__module__": mixin.__module__, "__doc__": doc})
    return _MADE[mixin, base]
