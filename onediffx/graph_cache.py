"""The compiled-graph cache: entries keyed by everything that invalidates them.

Layout: ``<dir>/<component>/<key hash>/`` holds ``manifest.json`` (the key in readable form, and
one record per graph: file, size, sha256, input signature) and ``graph-<i>.bin``. A new key gets a
new folder, so a cache shared by jobs of different dtypes or cards keeps one entry for each.

Writes go to a temporary folder that is renamed into place under a file lock, so a reader never
sees half an entry and two jobs saving the same entry leave one valid entry. A reader checks every
file against the manifest before using it; a truncated, corrupt or unreadable entry is reported in
one line, removed and rebuilt by compiling, never fatal.

The graph files are Dynamo/Inductor artifacts, which are pickles (as Inductor's own on-disk caches
are): load them only from a directory you trust, as you would ``~/.cache/torch``. The sha256 check
guards against damage, not against an attacker who can write the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

import torch
from filelock import FileLock

log = logging.getLogger("onediffx.graph_cache")

FORMAT = 2  # 2: graphs carry only portable guards (see compile/guards.py)


def _version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment_key(device: torch.device) -> dict[str, Any]:
    """What makes compiled code from one machine invalid on another."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "format": FORMAT,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device": gpu or f"cpu-{platform.machine()}",
        "python": platform.python_version(),
        "diffusers": _version("diffusers"),
    }


def config_digest(module: torch.nn.Module) -> str:
    """A digest of the component's architecture: its diffusers config, else its module tree."""
    config = getattr(module, "config", None)
    if config is None:
        text = repr(module)
    else:  # private keys ("_use_default_values", "_name_or_path") vary by process and origin
        text = json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class Loaded:
    blobs: list[bytes]
    signatures: list[Any]
    path: Path


class GraphCache:
    """One cache folder; ``save`` and ``load`` work on entries named by component and key."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self.last_miss = ""
        """Why the last ``load`` missed: ``absent``, ``stale`` (other keys exist) or ``corrupt``."""

    def entry_dir(self, component: str, key: dict[str, Any]) -> Path:
        return self.root / component / key_hash(key)

    def _lock(self, entry: Path) -> FileLock:
        entry.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(entry) + ".lock", timeout=600)

    # -- writing -------------------------------------------------------------------------------------

    def save(self, component: str, key: dict[str, Any], blobs: list[bytes], signatures: list[Any]) -> Path:
        """Write an entry atomically; an existing entry for the key is replaced whole."""
        entry = self.entry_dir(component, key)
        with self._lock(entry):
            tmp = entry.parent / f".tmp-{uuid.uuid4().hex}"
            tmp.mkdir(parents=True)
            records = []
            for i, (blob, signature) in enumerate(zip(blobs, signatures)):
                name = f"graph-{i}.bin"
                (tmp / name).write_bytes(blob)
                records.append({"file": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                                "signature": signature})
            manifest = {"component": component, "key": key, "key_hash": entry.name, "graphs": records}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
            old = None
            if entry.exists():
                old = entry.parent / f".old-{uuid.uuid4().hex}"
                entry.rename(old)
            tmp.rename(entry)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return entry

    # -- reading -------------------------------------------------------------------------------------

    def load(self, component: str, key: dict[str, Any]) -> Optional[Loaded]:
        """The entry's graphs, or ``None`` on a miss (corrupt entries are reported and removed)."""
        entry = self.entry_dir(component, key)
        with self._lock(entry):
            if not entry.exists():
                self.last_miss = "stale" if self._explain_miss(component, key) else "absent"
                return None
            try:
                return self._read(entry, key)
            except (OSError, ValueError, KeyError) as err:
                self.discard(entry, f"{err}")
                return None

    def _read(self, entry: Path, key: dict[str, Any]) -> Loaded:
        manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
        if json.dumps(manifest["key"], sort_keys=True, default=str) != json.dumps(key, sort_keys=True, default=str):
            raise ValueError("its manifest key does not match the folder's key")
        blobs = []
        for record in manifest["graphs"]:
            blob = (entry / record["file"]).read_bytes()
            if len(blob) != record["bytes"] or hashlib.sha256(blob).hexdigest() != record["sha256"]:
                raise ValueError(f"{record['file']} is truncated or corrupt (sha256 mismatch)")
            blobs.append(blob)
        return Loaded(blobs=blobs, signatures=[r["signature"] for r in manifest["graphs"]], path=entry)

    def discard(self, entry: Path, reason: str) -> None:
        """Report a bad entry in one line and remove it, so the next save rebuilds it."""
        self.last_miss = "corrupt"
        log.warning("graph cache entry %s is unusable (%s); rebuilding it", entry, reason)
        shutil.rmtree(entry, ignore_errors=True)

    def _explain_miss(self, component: str, key: dict[str, Any]) -> bool:
        """Say which key fields differ from the nearest entry of the same component, if any."""
        nearest: Optional[list[str]] = None
        for manifest in (self.root / component).glob("*/manifest.json"):
            try:
                other = json.loads(manifest.read_text(encoding="utf-8"))["key"]
            except (OSError, ValueError, KeyError):
                continue
            diff = [f"{k}: {other.get(k)!r} -> {key.get(k)!r}" for k in sorted(set(key) | set(other))
                    if other.get(k) != key.get(k)]
            if nearest is None or len(diff) < len(nearest):
                nearest = diff
        if nearest:
            log.warning("graph cache: no %s entry for this key (nearest entry differs in %s); compiling",
                        component, "; ".join(nearest))
        return bool(nearest)
