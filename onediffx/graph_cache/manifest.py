"""The manifest of one cache entry, and the checks every field passes before any file is read.

A manifest is data from disk: valid JSON of the wrong shape (``[1, 2, 3]``, ``"graphs": "abc"``)
must be a rejected entry, not a ``TypeError`` at the first lookup. File names are plain names
inside the entry (no ``..``, no ``/``), sizes are bounded, hashes are hex of the right length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MAX_MANIFEST_BYTES = 16 << 20
"""A manifest holds a key and one record per file: more than this is not one onediffx wrote."""

GRAPH_NAME = re.compile(r"graph-\d{1,6}\.bin")
KERNEL_TARGET = re.compile(r"[0-9a-z]{2}/c[0-9a-z]{20,80}(\.main)?\.so")
"""Where Inductor keeps a built C++ kernel: ``<cache dir>/<2 chars>/c<hash>[.main].so``."""
KERNEL_NAME = re.compile(r"kernels/" + KERNEL_TARGET.pattern)
HEX64 = re.compile(r"[0-9a-f]{64}")
KEY_HASH = re.compile(r"[0-9a-f]{20}")


class ManifestError(ValueError):
    """The manifest is not one onediffx wrote: which field, and what it should be."""


@dataclass(frozen=True)
class FileRecord:
    file: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class GraphRecord(FileRecord):
    signature: Any


@dataclass(frozen=True)
class KernelRecord(FileRecord):
    target: str
    """Where the kernel goes in Inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR``)."""


@dataclass(frozen=True)
class Manifest:
    component: str
    key: dict
    key_hash: str
    graphs: list[GraphRecord]
    kernels: list[KernelRecord]
    hmac: str


def _field(obj: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise ManifestError(f"{where} has no {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}.{name} is {type(value).__name__}, not {names}")
    return value


def _match(pattern: re.Pattern, value: str, where: str) -> str:
    if not pattern.fullmatch(value):
        raise ManifestError(f"{where} {value[:80]!r} is not of the form {pattern.pattern}")
    return value


def _file(record: Any, where: str, name: re.Pattern) -> dict:
    if not isinstance(record, dict):
        raise ManifestError(f"{where} is {type(record).__name__}, not an object")
    size = _field(record, "bytes", int, where)
    if size < 0:
        raise ManifestError(f"{where}.bytes is negative")
    return dict(file=_match(name, _field(record, "file", str, where), f"{where}.file"), bytes=size,
                sha256=_match(HEX64, _field(record, "sha256", str, where), f"{where}.sha256"))


def parse(data: Any) -> Manifest:
    """A ``Manifest`` from decoded JSON, or ``ManifestError`` naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise ManifestError(f"the manifest is {type(data).__name__}, not an object")
    graphs = _field(data, "graphs", list, "manifest")
    kernels = data.get("kernels", [])
    if not isinstance(kernels, list):
        raise ManifestError(f"manifest.kernels is {type(kernels).__name__}, not list")
    records = []
    for i, record in enumerate(graphs):
        fields = _file(record, f"graphs[{i}]", GRAPH_NAME)
        if "signature" not in record:
            raise ManifestError(f"graphs[{i}] has no 'signature'")
        records.append(GraphRecord(**fields, signature=record["signature"]))
    kernel_records = []
    for i, record in enumerate(kernels):
        fields = _file(record, f"kernels[{i}]", KERNEL_NAME)
        target = _match(KERNEL_TARGET, _field(record, "target", str, f"kernels[{i}]"), f"kernels[{i}].target")
        kernel_records.append(KernelRecord(**fields, target=target))
    names = [r.file for r in records + kernel_records]
    if len(set(names)) != len(names):
        raise ManifestError("the manifest names one file twice")
    return Manifest(
        component=_field(data, "component", str, "manifest"),
        key=_field(data, "key", dict, "manifest"),
        key_hash=_match(KEY_HASH, _field(data, "key_hash", str, "manifest"), "manifest.key_hash"),
        graphs=records,
        kernels=kernel_records,
        hmac=_match(HEX64, _field(data, "hmac", str, "manifest"), "manifest.hmac"),
    )
