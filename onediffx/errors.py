"""Errors a user can act on.

Every ``OnediffxError`` carries one line: what went wrong, which key or file, and how to fix it.
The CLI prints that line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OnediffxError(Exception):
    """Base of errors whose message is meant for the user, not for a traceback."""

    exit_code = 2


class ConfigError(OnediffxError):
    """A config value is out of range, of the wrong type, or names something unknown."""


class NotFoundError(OnediffxError):
    """A model, LoRA, file or cache that the config names is not where it says."""


class NotAvailableError(OnediffxError):
    """A capability is not available here (optional package missing, stage not built yet)."""


class BusyError(OnediffxError):
    """Another process holds what this one needs (an output folder): nothing was changed."""


class BenchError(OnediffxError):
    """A bench ran but its record cannot serve what it was asked for (a headline on a shared GPU)."""

    exit_code = 1


class NonFiniteError(OnediffxError):
    """The computation produced NaN or Inf: the output would be wrong, so there is none."""

    exit_code = 1

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step
