"""The allowed range of every per-call value, shared by the CLI, prompts files and HTTP requests.

One table, so a value the CLI refuses is refused the same way on line 900 of a prompts file and in a
request to the server. The limits are what the libraries underneath can take, not taste:
torch's generators take 64-bit seeds, diffusers' schedulers have 1000 training timesteps, and a
side past 16384 pixels is far beyond any model here (memory is checked separately, against the
device, by ``onediffx.device.check_memory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

SEED_MAX = 2**63 - 1
STEPS_MAX = 1000
SIDE_MAX = 16384
NUM_IMAGES_MAX = 256
GUIDANCE_MAX = 100.0
LORA_SCALE_MAX = 100.0
"""A LoRA scale past this multiplies its delta into overflow in half precision: not a weighting."""
REPEAT_MAX = 10_000
PROMPT_CHARS_MAX = 10_000


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Limit:
    """An integer or number range; ``multiple`` for sizes that the VAE's down-sampling needs."""

    low: float
    high: float
    integer: bool = True
    multiple: int = 1

    def allows(self, value: Any) -> bool:
        if not (is_int(value) if self.integer else is_number(value)):
            return False
        return math.isfinite(value) and self.low <= value <= self.high and (not self.integer or value % self.multiple == 0)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.multiple > 1:
            kind = f"a multiple of {self.multiple}"
        high = f"{self.high:g}" if not self.integer else f"{int(self.high)}"
        if self.high == SEED_MAX:
            high = "2^63-1"
        return f"{kind} from {self.low:g} to {high}"


LIMITS: dict[str, Limit] = {
    "seed": Limit(0, SEED_MAX),
    "steps": Limit(1, STEPS_MAX),
    "height": Limit(8, SIDE_MAX, multiple=8),
    "width": Limit(8, SIDE_MAX, multiple=8),
    "num_images": Limit(1, NUM_IMAGES_MAX),
    "guidance": Limit(0, GUIDANCE_MAX, integer=False),
    "repeat": Limit(1, REPEAT_MAX),
    "scale": Limit(-LORA_SCALE_MAX, LORA_SCALE_MAX, integer=False),
}
"""By the last part of the key: ``model.steps`` and a prompts line's ``steps`` share ``steps``; ``scale`` is a
LoRA's (``lora.<name>.scale``, a prompts line's ``lora_scales``, a request's ``loras``)."""


def problem(name: str, value: Any) -> Optional[str]:
    """What is wrong with ``value`` for the per-call setting ``name`` (``None``: nothing)."""
    limit = LIMITS[name]
    if value is None or limit.allows(value):
        return None
    return f"{value!r} is not allowed; expected {limit.describe()}"


def text_problem(value: Any, *, required: bool) -> Optional[str]:
    """Prompts are data: any text is fine except what cannot be encoded, or is absurdly long."""
    if value is None:
        return "a non-empty string is required" if required else None
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if required and not value.strip():
        return "a non-empty string is required"
    if len(value) > PROMPT_CHARS_MAX:
        return f"{len(value)} characters; at most {PROMPT_CHARS_MAX} are allowed"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"holds {value[err.start]!r} at character {err.start}, which is not valid Unicode text (a lone surrogate); fix the text"
    return None
