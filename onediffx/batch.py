"""Batch prompts: ``prompts=file.jsonl`` generates one image per line with one assembled pipeline.

A batch can run for hours, so it is built to be interrupted. The whole file is checked before the
model loads (a typo on line 900 should not cost a model load and 899 images); each image is written
under a temporary name and renamed, then recorded in ``manifest.jsonl`` with a flushed, fsynced
append, so a kill at any moment leaves only complete images and complete manifest lines; and
``resume=true`` in the same output folder skips every line the manifest already holds.

Each line is a JSON object::

    {"prompt": "a red fox", "negative_prompt": "blurry", "seed": 7, "height": 64, "width": 64,
     "steps": 4, "guidance": 5.0, "lora_scales": {"emoji": 0.5}}

Only ``prompt`` is required; the rest default to the run's own settings (``seed``, ``height``, ...).
``lora_scales`` re-weights entries of the run's LoRA stack for that line only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .config.limits import LIMITS, is_number, text_problem
from .config.schema import LoraStack
from .commands.outputs import job_facts, print_startup, say_done
from .device import peak_memory_gib, reset_peak_memory
from .errors import ConfigError, NonFiniteError, NotAvailableError, NotFoundError
from .generate import Settings, generate
from .metrics import versions, write_json
from .models.pipelines import task_of
from .resolver import assemble

MANIFEST = "manifest.jsonl"


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
    "lora_scales": (lambda v: isinstance(v, dict) and all(is_number(s) and math.isfinite(s) for s in v.values()),
                    "an object of LoRA name to finite number"),
}
"""Each value is literal data: a prompt like ``${oc.env:TOKEN}`` is the text it shows, never resolved."""


def parse_line(text: str, index: int, line: int, cfg: DictConfig) -> PromptItem:
    """One line as a ``PromptItem``; a ``ValueError`` says what is wrong with it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise ValueError("not a prompt object: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object like {{\"prompt\": \"...\"}}, got {type(data).__name__}")
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
    for line, raw in enumerate(path.read_bytes().splitlines(), start=1):
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


def read_manifest(path: Path) -> dict[int, dict[str, Any]]:
    """Done items by index; a torn last line (killed mid-write) is ignored: that item is redone."""
    done: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "index" in entry:
            done[int(entry["index"])] = entry
    return done


def pending(items: list[PromptItem], done: dict[int, dict[str, Any]], out_dir: Path) -> list[PromptItem]:
    """Items the manifest does not hold yet, or whose image is missing or not the one recorded; an
    entry that no longer matches its line is an error."""
    todo = []
    for item in items:
        entry = done.get(item.index)
        if entry is None or not _intact(out_dir / item.file, entry):
            todo.append(item)
            continue
        recorded = {k: entry.get(k) for k in item.spec()}
        if recorded != item.spec():
            raise ConfigError(
                f"resume: prompts line {item.line} changed since {out_dir / MANIFEST} recorded it; "
                f"resume only with the same prompts file, or start a new hydra.run.dir"
            )
    return todo


def drop_torn_line(path: Path) -> None:
    """Cut a last line left without its newline by a kill, so the next append starts a clean line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())


def append_manifest(path: Path, entry: dict[str, Any]) -> None:
    """One durable line: flushed and fsynced before the next item starts."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


class LoraScales:
    """Re-fuses the LoRA stack when a line's scales differ from what is fused now."""

    def __init__(self, cfg: DictConfig) -> None:
        stack = LoraStack.from_config(cfg.lora).entries
        self.entries = [(key, entry.adapter_name, float(entry.scale)) for key, entry in stack.items()]
        self.current = [scale for _, _, scale in self.entries]

    def apply(self, pipe: Any, item: PromptItem) -> None:
        weights = [item.lora_scales.get(key, scale) for key, _, scale in self.entries]
        if weights == self.current:
            return
        try:
            from .lora import set_and_fuse_adapters
        except ImportError as err:
            raise NotAvailableError(
                f"prompts: line {item.line} sets lora_scales but the LoRA engine is not available ({err})"
            ) from None
        set_and_fuse_adapters(pipe, [name for _, name, _ in self.entries], weights)
        self.current = weights


def _intact(path: Path, entry: dict[str, Any]) -> bool:
    """The file is the one the manifest recorded (same size and sha256), not a torn or replaced one."""
    if "sha256" not in entry:  # written before images were hashed: trust the file if it is there
        return path.is_file()
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return len(data) == entry.get("bytes") and hashlib.sha256(data).hexdigest() == entry.get("sha256")


def _save_png(image: Any, path: Path) -> dict[str, Any]:
    """Write whole or not at all: a temporary name, fsynced, renamed; returns its size and hash."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _outputs(manifest: Path) -> dict[str, Any]:
    """Every image the manifest holds (this run's and resumed ones), as run metrics list them."""
    entries = sorted(read_manifest(manifest).values(), key=lambda e: e["index"])
    return {
        "outputs": [e["file"] for e in entries],
        "images": [dict(file=e["file"], seed=e["seed"], frame=0, prompt=e["prompt"],
                        negative_prompt=e["negative_prompt"]) for e in entries],
    }


def run_batch(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Generate every pending line of ``cfg.prompts``; returns what was written to ``metrics.json``."""
    if task_of(cfg.model.pipeline) == "img2vid":
        raise ConfigError(f"prompts: model {cfg.model.name} turns images into video; batch prompts need a text-to-image model")
    prompts = read_prompts(cfg)
    manifest = out_dir / MANIFEST
    if manifest.is_file() and not cfg.resume:
        raise ConfigError(f"prompts: {manifest} exists; pass resume=true to continue it, or choose another hydra.run.dir")
    if cfg.resume:
        drop_torn_line(manifest)
    done = read_manifest(manifest) if cfg.resume else {}
    todo = pending(prompts.items, done, out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    counts = {"prompts_file": str(cfg.prompts), "prompts": len(prompts.items), "generated": len(todo),
              "resumed": len(prompts.items) - len(todo), "bad_lines": prompts.bad_lines}
    if not todo:  # a finished batch resumed again: nothing to load the model for
        print(f"prompts: all {len(prompts.items)} already in {manifest}", flush=True)
        metrics = {"status": "ok", "model": cfg.model.name, **counts, **_outputs(manifest), "versions": versions()}
        write_json(out_dir / "metrics.json", metrics)
        return metrics
    asm = assemble(cfg, call_shapes=[(i.height, i.width, 1) for i in todo])
    asm.pipe.set_progress_bar_config(disable=True)  # the bar is over prompts, not steps
    reset_peak_memory(asm.device)
    loras = LoraScales(cfg)
    seconds, rates, failed = [], [], []
    for item in tqdm(todo, desc="prompts", unit="prompt", initial=len(prompts.items) - len(todo),
                     total=len(prompts.items)):
        loras.apply(asm.pipe, item)
        settings = Settings(height=item.height, width=item.width, steps=item.steps, guidance=item.guidance,
                            seeds=[item.seed], prompt=item.prompt, negative_prompt=item.negative_prompt)
        try:
            result = generate(asm, settings)
        except NonFiniteError as err:  # one broken line must not cost the rest of the batch
            print(f"onediffx: warning: prompts line {item.line}: {err}", file=sys.stderr, flush=True)
            failed.append({"line": item.line, "index": item.index, "error": str(err), "step": err.step})
            continue
        saved = _save_png(result.images[0], out_dir / item.file)
        append_manifest(manifest, {**item.spec(), "line": item.line, "file": item.file, **saved,
                                   "seconds": result.seconds})
        seconds.append(result.seconds)
        rates.append(item.steps / result.seconds)
        if len(seconds) == 1:
            print_startup(cfg, asm, result.seconds)

    asm.close()
    median = statistics.median(seconds) if seconds else None
    metrics = {
        "status": "failed" if failed else "ok",
        **job_facts(cfg, asm),
        **counts,
        "failed_lines": failed,
        "calls": len(seconds),
        "seconds_per_call": seconds,
        "median_seconds_per_call": median,
        "latency_per_image_s": median,
        "it_per_s": statistics.median(rates) if rates else None,
        "peak_memory_gib": peak_memory_gib(asm.device),
        **_outputs(manifest),
        "versions": versions(),
    }
    write_json(out_dir / "metrics.json", metrics)
    if failed:  # the others are written and recorded; resume=true retries only the failed lines
        lines = ", ".join(str(f["line"]) for f in failed[:5]) + (" ..." if len(failed) > 5 else "")
        raise NonFiniteError(f"prompts: {len(failed)} of {len(todo)} lines failed (lines {lines}): {failed[0]['error']}; "
                             f"see {out_dir / 'metrics.json'}", step=failed[0]["step"])
    say_done(out_dir, [item.file for item in todo], median)
    return metrics
