"""Give back what Dynamo's guard building leaves in its process-wide scope (a torch bug).

Dynamo reads a guarded value by evaluating its source with one shared dict of helper functions,
``torch._dynamo.guards._CLOSURE_VARS``, as the local scope. A chained source (``L['self'].up_blocks[0]``
and deeper) parks its base object there as ``tmp`` (``tmp0``, ...) and deletes it after the
evaluation, but not when the evaluation raises, which Dynamo catches and carries on from. The object
then lives as long as the process: on an H200 every compiled SDXL pipeline kept an up block of its
UNet (about 2 GiB) alive after the pipeline was released (``benchmarks/release_check.py``, fourteenth
session). A compile also copies the whole scope into its guards, so whatever an earlier failure left
there would live as long as the new graphs: onediffx's compiles and loads run inside ``clean_guard_scope``.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

_TEMPORARY = re.compile(r"tmp\d*")


def drop_guard_temporaries() -> int:
    """Remove the temporaries a failed source evaluation left in Dynamo's shared scope; return how many."""
    from torch._dynamo import convert_frame, guards

    scope = getattr(guards, "_CLOSURE_VARS", None)
    if not isinstance(scope, dict):
        return 0
    with convert_frame.compile_lock:  # Dynamo's own compiles evaluate sources under it
        stale = [key for key in scope if _TEMPORARY.fullmatch(key)]
        for key in stale:
            del scope[key]
    return len(stale)


@contextlib.contextmanager
def clean_guard_scope() -> Iterator[None]:
    """Run a compile or load with nothing stale in Dynamo's scope, and leave nothing behind."""
    drop_guard_temporaries()
    try:
        yield
    finally:
        drop_guard_temporaries()
