"""How the last multirun of this process ended, for the CLI's exit code.

Hydra's sweeper returns nothing the CLI can read, and launcher workers may be other processes, so
the sweep callback (in the process that started the sweep) counts the jobs from what they wrote
and leaves the count here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class SweepOutcome:
    jobs: int = 0
    failed: int = 0
    summary: Optional[Path] = None
    """The sweep folder's ``summary.md`` (or the folder, when no summary was written)."""


OUTCOME = SweepOutcome()
