"""The manifest journal of a batch: what is done, written so that a kill loses nothing finished.

Each image is written under a temporary name and renamed, then recorded in ``manifest.jsonl`` with
a flushed, fsynced append, so a kill at any moment leaves only complete images and complete
manifest lines; ``resume=true`` in the same output folder skips every line the manifest holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from ...bounded import BoundedInputError, parse_json, read_bytes
from ...config.limits import is_int
from ...errors import ConfigError
from .prompts import PromptItem

MANIFEST = "manifest.jsonl"
MAX_JOURNAL_BYTES = 1 << 30
"""Read whole on resume: a journal of a million images is a few hundred megabytes."""
MAX_LINE_BYTES = 1 << 20
"""One entry: an item's spec (two prompts, bounded) and the image's name and hash."""
MAX_INDEX = 2**31 - 1


def read_manifest(path: Path, warn: Optional[Callable[[str], None]] = None) -> dict[int, dict[str, Any]]:
    """Done items by index. Resume is the recovery path, so it survives its own journal being
    damaged: a line that is not a journal entry (not JSON, too deep, not UTF-8, an index that is not
    a small integer, no file name) is passed to ``warn`` in one line and its item is redone. A torn
    last line (killed mid-write) is redone the same way."""
    done: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return done
    try:
        lines = read_bytes(path, str(path), max_bytes=MAX_JOURNAL_BYTES).splitlines()
    except BoundedInputError as err:
        if warn:
            warn(f"{err}; every item is redone")
        return done
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            entry = _entry(raw, f"{path} line {number}")
        except BoundedInputError as err:
            if warn:
                warn(f"{err}; that item is redone")
            continue
        done[entry["index"]] = entry
    return done


def _entry(raw: bytes, where: str) -> dict[str, Any]:
    """One journal line, checked for what resume relies on: an ``index`` and a ``file`` name."""
    entry = parse_json(raw, where, dict, max_bytes=MAX_LINE_BYTES)
    index = entry.get("index")
    if not (is_int(index) and 0 <= index <= MAX_INDEX):
        shown = repr(index) if len(repr(index)) <= 40 else repr(index)[:37] + "..."
        raise BoundedInputError(where, f"index {shown} is not an integer from 0 to {MAX_INDEX}")
    if not isinstance(entry.get("file"), str):
        raise BoundedInputError(where, "has no 'file' name")
    return entry


def pending(items: list[PromptItem], done: dict[int, dict[str, Any]], out_dir: Path) -> list[PromptItem]:
    """Items the manifest does not hold yet, or whose image is missing or not the one recorded; an
    entry that no longer matches its line is an error."""
    todo = []
    for item in items:
        entry = done.get(item.index)
        if entry is None or not intact(out_dir / item.file, entry):
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


def intact(path: Path, entry: dict[str, Any]) -> bool:
    """The file is the one the manifest recorded (same size and sha256), not a torn or replaced one."""
    if "sha256" not in entry:  # written before images were hashed: trust the file if it is there
        return path.is_file()
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return len(data) == entry.get("bytes") and hashlib.sha256(data).hexdigest() == entry.get("sha256")


def save_png(image: Any, path: Path) -> dict[str, Any]:
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


def outputs(manifest: Path) -> dict[str, Any]:
    """Every image the manifest holds (this run's and resumed ones), as run metrics list them."""
    entries = sorted(read_manifest(manifest).values(), key=lambda e: e["index"])
    return {
        "outputs": [e["file"] for e in entries],
        "images": [dict(file=e["file"], seed=e.get("seed"), frame=0, prompt=e.get("prompt"),
                        negative_prompt=e.get("negative_prompt")) for e in entries],
    }
