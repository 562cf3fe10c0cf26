"""How a user-facing error reaches the terminal: one line, or the traceback when asked for.

The CLI and the sweep callback (which reports a job's failure itself, so the sweep goes on) print
errors the same way; both read the user's wish here.
"""

from __future__ import annotations

import os
import sys

from ..errors import OnediffxError

# Worker processes of a launcher inherit the variable hydra_app sets; ONEDIFFX_FULL_ERROR keeps
# what the user asked for.
USER_FULL_ERROR = os.environ.get("ONEDIFFX_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR")) == "1"


def full_error() -> bool:
    """Whether the user asked for tracebacks (read before ``hydra_app`` sets the variable itself)."""
    return USER_FULL_ERROR


def report(err: OnediffxError) -> None:
    """The one line a user error prints."""
    print(f"onediffx: error: {err}", file=sys.stderr, flush=True)
