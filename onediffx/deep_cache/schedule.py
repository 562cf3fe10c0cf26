"""Which denoising steps run the full UNet; the others replay the deep features of the last full one.

``uniform`` is DeepCache's default: a full step every ``interval`` steps, starting at step 0.
``nonuniform`` is the paper's "non-uniform 1:N" strategy: the same number of full steps, packed
densely around a ``center`` step (about 30% into the run, where features change fastest) and sparser
towards both ends. The DeepCache package computes those points through a complex power of a negative
number; here the same curve, ``c + sign(u) * |u| ** power`` over evenly spaced ``u``, is computed in
real numbers.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Optional

import numpy as np


class ScheduleKind(str, Enum):
    """Which steps are full steps (``deepcache.schedule``, ``cache_schedule=``)."""

    uniform = "uniform"
    nonuniform = "nonuniform"


SCHEDULES = tuple(kind.value for kind in ScheduleKind)


def uniform(num_steps: int, interval: int) -> list[int]:
    """Full steps 0, interval, 2 * interval, ..."""
    return list(range(0, num_steps, interval))


def nonuniform(num_steps: int, interval: int, center: Optional[int] = None, power: float = 1.4) -> list[int]:
    """``ceil(num_steps / interval)`` full steps, densest around ``center`` (default 30% of the run).

    The power is lowered in small steps (as the paper's code does) until the rounded points are distinct;
    if none works the uniform schedule is returned, which has the same number of full steps.
    """
    n_full = math.ceil(num_steps / interval)
    if interval <= 1 or n_full >= num_steps:
        return list(range(num_steps))
    c = int(round(0.3 * num_steps)) if center is None else int(center)
    c = min(max(c, 0), num_steps - 1)
    p = power
    while p > 1.0:
        u = np.linspace(-(c ** (1 / p)), (num_steps - c) ** (1 / p), n_full + 1)
        points = np.floor(c + np.sign(u) * np.abs(u) ** p).astype(int)
        steps = sorted({0, *(int(s) for s in points[:-1] if 0 <= s < num_steps)})
        if len(steps) == n_full:
            return steps
        p -= 0.02
    return uniform(num_steps, interval)


def full_steps(num_steps: int, interval: int, schedule: str = "uniform") -> frozenset[int]:
    """The set of step indices that run the full UNet."""
    if schedule == "uniform":
        return frozenset(uniform(num_steps, interval))
    if schedule == "nonuniform":
        return frozenset(nonuniform(num_steps, interval))
    raise ValueError(f"unknown DeepCache schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
