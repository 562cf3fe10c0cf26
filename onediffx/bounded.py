"""One reader for every JSON file or line that comes from outside: bounded in size and nesting.

Python's ``json`` recurses once per ``[`` or ``{``: a file of 100,000 brackets is a
``RecursionError`` (a traceback, or a crashed start where the file is a cache entry), and a
multi-gigabyte file is read whole before anything checks it. Every outside JSON (graph cache
manifests, LoRA metadata and PEFT configs, InstantID key points, prompts files, the batch journal)
goes through ``read_json``/``parse_json`` here instead, which refuse before parsing: more bytes
than the caller allows, text that is not UTF-8, nesting deeper than the caller allows (counted
without recursion), and a top-level value of another type than the caller expects. Each refusal
is one ``BoundedInputError`` line naming the file (and key) and the limit.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .errors import OnediffxError

MAX_DEPTH = 64
"""Nesting any file onediffx reads needs (a manifest's signatures are the deepest, about 6 levels)."""

Expected = Union[type, tuple[type, ...]]
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
"""A JSON string, or an unterminated one up to the end: every match attempt succeeds, so the scan
stays linear (a pattern that can fail would retry from each later quote: quadratic on ``"\\"\\"...``)."""
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


class BoundedInputError(OnediffxError, ValueError):
    """An outside file or line that breaks a limit or is not the JSON its reader expects.

    A ``ValueError`` too, so readers that already turn ``ValueError`` into their own error
    (a quarantined cache entry, a skipped prompts line) handle it without a special case.
    ``reason`` is the line without its ``where``, for callers that name the place themselves.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def depth(data: bytes) -> int:
    """How deep the brackets of ``data`` nest, outside strings; counted in C (regex and numpy),
    never by recursing, so a 100,000-deep file costs one pass, not the stack."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    levels = np.cumsum(_STEP[np.frombuffer(brackets, dtype=np.uint8)], dtype=np.int64)
    return int(levels.max())


def parse_json(data: Union[bytes, str], where: str, expect: Expected, *, max_bytes: int,
               max_depth: int = MAX_DEPTH) -> Any:
    """``data`` decoded as JSON of type ``expect`` (``dict``, ``list`` or both as a tuple), or one
    ``BoundedInputError`` line starting with ``where``: callers index the value without re-checking."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise BoundedInputError(where, f"{len(raw)} bytes, more than the {max_bytes} allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BoundedInputError(where, f"not UTF-8 text (byte {err.start + 1}); save it as UTF-8") from None
    nesting = depth(raw)
    if nesting > max_depth:
        raise BoundedInputError(where, f"JSON nested too deeply ({nesting} levels; at most {max_depth} allowed)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise BoundedInputError(where, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (ValueError, RecursionError) as err:  # an integer past int_max_str_digits; brackets a string hid
        raise BoundedInputError(where, f"not valid JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(value, expect):
        wanted = " or ".join(_kind(k) for k in (expect if isinstance(expect, tuple) else (expect,)))
        raise BoundedInputError(where, f"expected a JSON {wanted}, got {_kind(type(value))}")
    return value


def read_bytes(path: Union[str, os.PathLike], where: str, *, max_bytes: int) -> bytes:
    """A regular file's bytes, refused before reading when it is larger than ``max_bytes``
    (a sparse file may declare any size) or is not a regular file (a FIFO would block).
    ``where`` names the file in every error line."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise BoundedInputError(where, "not a regular file")
        if info.st_size > max_bytes:
            raise BoundedInputError(where, f"{info.st_size} bytes, more than the {max_bytes} allowed")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise BoundedInputError(where, f"cannot be read ({err.strerror or err})") from None
    if len(data) > max_bytes:  # grew while being read
        raise BoundedInputError(where, f"more than the {max_bytes} bytes allowed")
    return data


def read_json(path: Union[str, os.PathLike], expect: Expected, *, max_bytes: int, max_depth: int = MAX_DEPTH,
              where: Optional[str] = None) -> Any:
    """The JSON file at ``path`` as ``expect``; ``where`` (default: the path) starts every error line."""
    label = where or str(path)
    return parse_json(read_bytes(path, label, max_bytes=max_bytes), label, expect,
                      max_bytes=max_bytes, max_depth=max_depth)


def _kind(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(kind, kind.__name__)
