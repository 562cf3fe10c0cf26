"""Give back what Dynamo's guard building leaves in its process-wide scope (a torch bug).

Dynamo reads a guarded value by evaluating its source with one shared dict of helper functions
(``torch._dynamo.guards._CLOSURE_VARS``; ``CLOSURE_VARS`` in older releases) as the local scope. A
chained source (``L['self'].up_blocks[0]`` and deeper) parks its base object there as ``tmp``
(``tmp0``, ...) and deletes it after the evaluation, but not when the evaluation raises, which Dynamo
catches and carries on from. The object then lives as long as the process: on an H200 every compiled
tiny SDXL kept an up block of its UNet alive after the pipeline was released
(``benchmarks/release_check.py``, fourteenth session; SDXL's largest up block is 2.25 GiB in bf16).
A compile also copies the whole scope into its guards, so what an earlier failure left there lives as
long as the new graphs too.

onediffx compiles, loads and serializes graphs inside ``clean_guard_scope``, and a compiled module
drops whatever is left when it is released (``drop_when_released``): that covers evaluations made
outside onediffx's calls as well.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from typing import Iterator

_TEMPORARY = re.compile(r"tmp\d*")


def _scopes() -> list[dict]:
    from torch._dynamo import guards

    return [scope for name in ("_CLOSURE_VARS", "CLOSURE_VARS")
            if isinstance(scope := getattr(guards, name, None), dict)]


def drop_guard_temporaries(wait: bool = True) -> int:
    """Remove the temporaries failed source evaluations left in Dynamo's shared scope; return how many.

    Dynamo's own compiles evaluate sources under its compile lock, so this takes it too; with
    ``wait=False`` (from a finalizer, which may run in any thread at any allocation) it gives up
    rather than wait for a compile to finish.
    """
    from torch._dynamo.convert_frame import compile_lock

    if not compile_lock.acquire(blocking=wait):
        return 0
    try:
        dropped = 0
        for scope in _scopes():
            for key in [key for key in scope if _TEMPORARY.fullmatch(key)]:
                del scope[key]
                dropped += 1
        return dropped
    finally:
        compile_lock.release()


@contextlib.contextmanager
def clean_guard_scope() -> Iterator[None]:
    """Run a compile, load or save with nothing stale in Dynamo's scope, and leave nothing behind."""
    drop_guard_temporaries()
    try:
        yield
    finally:
        drop_guard_temporaries()


def drop_when_released(module: object) -> None:
    """When ``module`` is garbage-collected, drop what Dynamo's scope still holds of it (or of anything)."""
    weakref.finalize(module, drop_guard_temporaries, False)
