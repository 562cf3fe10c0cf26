"""Keep Dynamo's guard building from holding modules for the life of the process (a torch bug).

Dynamo reads a guarded value by evaluating its source with one shared dict of helper functions
(``torch._dynamo.guards._CLOSURE_VARS``; ``CLOSURE_VARS`` in older releases) as the local scope. A
chained source (``L['self'].up_blocks[0]`` and deeper, ``torch._guards.ChainedSource``) parks its base
object there as ``tmp`` (``tmp0``, ...) and deletes it after the evaluation, but not when the
evaluation raises, which Dynamo catches and carries on from. The object then lives as long as the
process, and every guard built afterwards copies the scope, and the object with it, into its own
closure. On an H200 every compiled tiny SDXL kept an up block of its UNet alive after the pipeline was
released (``benchmarks/scripts/release_check.py``; SDXL's largest up block is 2.25 GiB in
bf16, and 2.61 GiB stayed allocated after the bench released a compiled SDXL).

``install`` wraps ``ChainedSource.get_value`` so that a failed evaluation removes what it parked, and
``prepare_guard_scope`` (before onediffx's compiles and loads) drops what was left before that.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from ..state import CLEANS_UP

_TEMPORARY = re.compile(r"tmp\d*")


def _temporaries(scope: dict) -> set[str]:
    return {key for key in scope if isinstance(key, str) and _TEMPORARY.fullmatch(key)}


def install() -> None:
    """Make a failed source evaluation take back the temporary it parked (idempotent)."""
    from torch._guards import ChainedSource

    original = getattr(ChainedSource, "get_value", None)
    if original is None or CLEANS_UP.get(original, False):
        return

    @functools.wraps(original)
    def get_value(self: Any, *args: Any, **kwargs: Any) -> Any:
        # (globals, locals, ...): passed through as given, whatever a torch release adds
        scope = kwargs.get("locals", args[1] if len(args) > 1 else None)
        before = _temporaries(scope) if isinstance(scope, dict) else set()
        try:
            return original(self, *args, **kwargs)
        except BaseException:
            if isinstance(scope, dict):
                for key in _temporaries(scope) - before:
                    scope.pop(key, None)
            raise

    CLEANS_UP.set(get_value, True)
    ChainedSource.get_value = get_value


def drop_guard_temporaries() -> int:
    """Remove the temporaries failed evaluations left in Dynamo's shared scope; return how many."""
    from torch._dynamo import guards
    from torch._dynamo.convert_frame import compile_lock

    with compile_lock:  # Dynamo's own compiles evaluate sources under it
        dropped = 0
        for name in ("_CLOSURE_VARS", "CLOSURE_VARS"):
            scope = getattr(guards, name, None)
            if isinstance(scope, dict):
                for key in _temporaries(scope):
                    del scope[key]
                    dropped += 1
        return dropped


def prepare_guard_scope() -> None:
    """Before a compile or load: the fix installed, and nothing an earlier failure left in Dynamo's
    scope for the new guards to copy. (Once installed, nothing new is left there afterwards.)"""
    install()
    drop_guard_temporaries()
