"""The prompts file of a batch: one JSON object a line, each checked before the model loads.

A typo on line 900 should not cost a model load and 899 images, so the whole file is read and
checked first. Each line is a JSON object::

    {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 7, "height": 64, "width": 64,
     "steps": 4, "guidance": 5.0, "lora_scales": {"emoji": 0.5}}

Only ``prompt`` is required; the rest default to the run's own settings (``seed``, ``height``, ...).
``lora_scales`` re-weights entries of the run's LoRA stack for that line only.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from ...bounded import BoundedInputError, parse_json, read_bytes
from ...config.limits import LIMITS, text_problem
from ...errors import ConfigError, NotFoundError
from ...generate import Settings


MAX_LINE_BYTES = 1 << 20
"""A line holds two prompts of at most ``PROMPT_CHARS_MAX`` characters each, escaped: far below this."""
MAX_PROMPTS_BYTES = 1 << 30
"""The whole file is read (and checked) before the model loads, so it has to fit in memory."""


@dataclass(frozen=True)
class PromptItem:
    """One line of the prompts file, with the run's defaults filled in."""

    index: int
    """0-based position among the file's non-blank lines (bad lines count, so skipping one shifts nothing)."""
    line: int
    prompt: str
    negative_prompt: Optional[str]
    seed: int
    height: int
    width: int
    steps: int
    guidance: float
    lora_scales: dict[str, float] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return f"image_{self.index:05d}_seed{self.seed}.png"

    def spec(self) -> dict[str, Any]:
        """What the image depends on: a manifest entry with a different spec is not this item's image."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "line"}


@dataclass
class PromptFile:
    items: list[PromptItem]
    bad_lines: list[dict[str, Any]]
    """``{"line": n, "error": ...}`` for each line skipped under ``on_bad_line=skip``."""


def _limited(name: str) -> tuple[Callable[[Any], bool], str]:
    limit = LIMITS[name]
    return limit.allows, limit.describe()


FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompt": (lambda v: text_problem(v, required=True) is None, "a non-empty string of valid Unicode text"),
    "negative_prompt": (lambda v: text_problem(v, required=False) is None, "a string of valid Unicode text or null"),
    "seed": _limited("seed"),
    "height": _limited("height"),
    "width": _limited("width"),
    "steps": _limited("steps"),
    "guidance": _limited("guidance"),
    "lora_scales": (lambda v: isinstance(v, dict) and all(LIMITS["scale"].allows(s) for s in v.values()),
                    f"an object of LoRA name to {LIMITS['scale'].describe()}"),
}
"""Each value is literal data: a prompt like ``${oc.env:TOKEN}`` is the text it shows, never resolved."""


def parse_line(text: str, index: int, line: int, cfg: DictConfig) -> PromptItem:
    """One line as a ``PromptItem``; a ``ValueError`` says what is wrong with it."""
    try:
        data = parse_json(text, f"line {line}", dict, max_bytes=MAX_LINE_BYTES)
    except BoundedInputError as err:
        raise ValueError(f'{err.reason}; write one {{"prompt": "..."}} object a line') from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; allowed: {', '.join(FIELDS)}")
    if "prompt" not in data:
        raise ValueError("'prompt' is required")
    for key, value in data.items():
        ok, allowed = FIELDS[key]
        if not ok(value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ValueError(f"{key}: {shown} is not allowed; expected {allowed}")
    stack = list(cfg.lora.keys())
    for name in data.get("lora_scales", {}):
        if name not in stack:
            have = f"the stack is lora=[{','.join(stack)}]" if stack else "the run has no LoRA stack"
            raise ValueError(f"lora_scales: {name!r} is not in the LoRA stack ({have}); add it with lora=[...]")
    run = Settings.from_config(cfg)  # what a line leaves out, it takes from the run
    return PromptItem(
        index=index, line=line, prompt=data["prompt"],
        negative_prompt=data.get("negative_prompt", cfg.negative_prompt),
        seed=data.get("seed", cfg.seed),
        height=data.get("height", run.height),
        width=data.get("width", run.width),
        steps=data.get("steps", run.steps),
        guidance=float(data.get("guidance", run.guidance)),
        lora_scales={k: float(v) for k, v in data.get("lora_scales", {}).items()},
    )


def read_prompts(cfg: DictConfig) -> PromptFile:
    """Every line of ``cfg.prompts``; a bad line fails the run or is skipped (``on_bad_line``)."""
    path = Path(cfg.prompts)
    if not path.is_file():
        raise NotFoundError(
            f"prompts: {str(path)!r} does not exist; give a JSON-lines file with one {{\"prompt\": ...}} object a line"
        )
    items, bad = [], []
    index = 0
    try:
        lines = read_bytes(path, f"prompts: {path}", max_bytes=MAX_PROMPTS_BYTES).splitlines()
    except BoundedInputError as err:
        raise ConfigError(str(err)) from None
    for line, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            items.append(parse_line(_decode(raw), index, line, cfg))
        except ValueError as err:
            if cfg.on_bad_line == "fail":
                raise ConfigError(f"prompts: {path} line {line}: {err} (on_bad_line=skip skips such lines)") from None
            print(f"onediffx: warning: prompts: {path} line {line}: {err}; skipped", file=sys.stderr, flush=True)
            bad.append({"line": line, "error": str(err)})
        index += 1
    if not items:
        raise ConfigError(f"prompts: {path} holds no prompts; write one {{\"prompt\": ...}} object a line")
    return PromptFile(items, bad)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text (byte {err.start + 1} of the line); save the file as UTF-8") from None
