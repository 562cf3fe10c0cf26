"""``GraphCache``: one cache folder, entries keyed by everything that invalidates them.

Layout: ``<dir>/<component>/<key hash>/`` holds ``manifest.json`` (the key in readable form, one
record per graph and bundled kernel: file, size, sha256, and the graph's input signature; an
HMAC over all of it) and the files it names. A new key gets a new folder, so a cache shared by
jobs of different dtypes or cards keeps one entry for each.

Writes go to a temporary folder (files fsynced) renamed into place under a file lock, so a reader
never sees half an entry and two jobs saving the same entry leave one valid entry. A save keeps the
graphs of the entry it replaces whose input signatures it does not bring itself: processes that
each compile other shapes (parallel fills, replicas warmed on different sizes) fill one entry
together instead of each erasing the others' shapes. Nothing here
is fatal: a cache folder that is a file, a lock path that is a folder, a folder others can write,
an entry that fails a check: one warning line, and the run compiles as if nothing were saved.
A read-only cache folder loads without locking and is never written to. An entry that fails its
checks is moved to ``<dir>/.quarantine/`` (not deleted: it is the evidence), before any of its
files is unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock, Timeout

from ..bounded import parse_json
from . import trust
from .key import canonical, key_hash
from .manifest import MAX_MANIFEST_BYTES, FileRecord, Manifest, ManifestError, parse

log = logging.getLogger("onediffx.graph_cache")

QUARANTINE = ".quarantine"
QUARANTINE_KEEP = 16
"""Rejected entries kept for inspection; older ones go, so a bad neighbour cannot fill the disk."""
LOCK_TIMEOUT_S = 600
_said: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


class Unusable(Exception):
    """The cache folder or an entry cannot be used now; the message is one line with the fix."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Rejected(Exception):
    """An entry failed a check (schema, signature, size, sha256): it is quarantined."""


@dataclass
class Loaded:
    blobs: list[bytes]
    signatures: list[Any]
    path: Path
    kernels: list[tuple[str, bytes]] = field(default_factory=list)
    """Bundled C++ kernels: (path inside Inductor's cache folder, the library's bytes)."""


def _read_bounded(path: Path, size: Optional[int], limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """A regular file's bytes, refused before reading when its size is not what was promised."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise Rejected(f"{path.name} is not a regular file")
    if size is not None and info.st_size != size:
        raise Rejected(f"{path.name} is {info.st_size} bytes, its manifest says {size} (truncated or corrupt)")
    if info.st_size > limit:
        raise Rejected(f"{path.name} is {info.st_size} bytes, more than the {limit} allowed")
    with open(path, "rb") as f:
        data = f.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise Rejected(f"{path.name} changed size while being read (truncated or corrupt)")
    return data


def _manifest_json(path: Path) -> dict[str, Any]:
    """A manifest's JSON object, through the bounded reader: a deep, huge, non-UTF-8 or non-object
    manifest is a ``ValueError`` (the entry is quarantined), never a ``RecursionError`` at start-up."""
    return parse_json(_read_bounded(path, None), path.name, dict, max_bytes=MAX_MANIFEST_BYTES)


def _mkdirs(path: Path) -> None:
    """``mkdir -p`` with 0755 for every folder made (``Path.mkdir`` gives parents the umask's
    mode: under umask 002 the cache would be group-writable, and refused by its own trust check)."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o755)
        except FileExistsError:
            if not folder.is_dir():
                raise


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: old -> new`` for each differing field, nested ones (``process.num_threads``) by name."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif canonical(a) != canonical(b):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class GraphCache:
    """One cache folder; ``save`` and ``load`` work on entries named by component and key.

    ``trusted``: load even from a folder that others can write (the signature still has to
    match). ``key_file``: the signing secret (default: ``trust.default_key_file()``).
    """

    def __init__(self, root: str | os.PathLike, *, trusted: bool = False,
                 key_file: Optional[str | os.PathLike] = None) -> None:
        self.root = Path(root).expanduser()
        self.trusted = trusted
        self.key_file = Path(key_file).expanduser() if key_file else trust.default_key_file()
        self.last_miss = ""
        """Why the last ``load`` missed: ``absent``, ``stale`` (other keys exist), ``corrupt``
        (rejected and quarantined), ``untrusted`` or ``unreadable``."""
        self._secret: Optional[bytes] = None

    def entry_dir(self, component: str, key: dict[str, Any]) -> Path:
        return self.root / component / key_hash(key)

    # -- checks shared by reading and writing --------------------------------------------------------

    def _check_root(self) -> None:
        """The cache folder, if it exists, is a folder this user may trust."""
        if self.root.exists() and not self.root.is_dir():
            raise Unusable(f"cache.dir {self.root} is a file, not a folder; compiling without the graph cache "
                           f"(point cache.dir at a folder)", "unreadable")
        if self.root.is_dir():
            self._check_trusted(self.root)

    def _check_trusted(self, path: Path) -> None:
        if self.trusted:
            return
        reason = trust.untrusted_reason(path)
        if reason:
            raise Unusable(f"graph cache refused: {reason}, so anyone there could plant code in it; "
                           f"use a folder only you can write (chmod go-w {path}) or set cache.trusted=true", "untrusted")

    def _secret_key(self) -> bytes:
        if self._secret is None:
            try:
                self._secret = trust.load_secret(self.key_file, create=True)
            except trust.TrustError as err:
                raise Unusable(f"graph cache not used: {err}", "unreadable") from None
        return self._secret  # type: ignore[return-value]

    def _lock(self, entry: Path) -> FileLock:
        path = Path(str(entry) + ".lock")
        if path.is_dir():
            raise Unusable(f"graph cache lock {path} is a folder; remove it (rmdir {path})", "unreadable")
        return FileLock(str(path), timeout=LOCK_TIMEOUT_S)

    def _locked(self, entry: Path, action):
        """``action()`` under the entry's lock; without it where the folder is read-only (then no
        one here writes it either)."""
        if not os.access(entry.parent, os.W_OK):
            return action()
        lock = self._lock(entry)
        try:
            lock.acquire()
        except Timeout:
            raise Unusable(f"graph cache lock {entry}.lock held for {LOCK_TIMEOUT_S} s by another process; "
                           f"compiling instead", "unreadable") from None
        except OSError as err:
            raise Unusable(f"graph cache lock {entry}.lock cannot be taken ({err.strerror}); compiling instead",
                           "unreadable") from None
        try:
            return action()
        finally:
            lock.release()

    # -- writing -------------------------------------------------------------------------------------

    def save(self, component: str, key: dict[str, Any], blobs: list[bytes], signatures: list[Any],
             kernels: list[tuple[str, bytes]] = ()) -> Optional[Path]:
        """Write an entry atomically; graphs of an existing entry for the key stay unless this save
        brings their signature. ``None`` when the cache cannot be written, said in one warning."""
        entry = self.entry_dir(component, key)
        try:
            self._check_root()
            secret = self._secret_key()
            read_only = Unusable(f"graph cache {self.root} is read-only: graphs load from it, new ones are not saved "
                                 f"(make it writable or point cache.dir elsewhere to keep them)", "unreadable")
            try:
                _mkdirs(entry.parent)
            except (PermissionError, OSError) as err:
                if isinstance(err, PermissionError) or err.errno == errno.EROFS:
                    raise read_only from None
                raise Unusable(f"graph cache {self.root} cannot be written ({err.strerror}); not saving", "unreadable") from None
            if not os.access(entry.parent, os.W_OK):
                raise read_only
            self._check_trusted(entry.parent)
            return self._locked(entry, lambda: self._write_entry(entry, component, key, blobs, signatures,
                                                                 kernels, secret))
        except Unusable as err:
            _warn_once(str(err))
            return None
        except OSError as err:
            _warn_once(f"graph cache {self.root}: saving {component} failed ({err}); not saved")
            return None

    def _kept(self, entry: Path, component: str, key: dict[str, Any], signatures: list[Any],
              kernels: list[tuple[str, bytes]], secret: bytes) -> tuple[list[bytes], list[Any], list[tuple[str, bytes]]]:
        """What of the entry being replaced this save keeps: its graphs for signatures the save does
        not bring and, when any are kept, the kernels the save lacks (those graphs may need them).
        An old entry that fails a check keeps nothing."""
        if not entry.is_dir():
            return [], [], []
        try:
            old = self._read(entry, component, key, secret)
        except (Rejected, ManifestError, OSError, ValueError):
            return [], [], []
        mine = {canonical(s) for s in signatures}
        graphs = [(b, s) for b, s in zip(old.blobs, old.signatures) if canonical(s) not in mine]
        if not graphs:
            return [], [], []
        have = {target for target, _ in kernels}
        return [b for b, _ in graphs], [s for _, s in graphs], [k for k in old.kernels if k[0] not in have]

    def _write_entry(self, entry: Path, component: str, key: dict[str, Any], blobs: list[bytes],
                     signatures: list[Any], kernels: list[tuple[str, bytes]], secret: bytes) -> Path:
        kept_blobs, kept_signatures, kept_kernels = self._kept(entry, component, key, signatures, kernels, secret)
        blobs, signatures = [*blobs, *kept_blobs], [*signatures, *kept_signatures]
        kernels = [*kernels, *kept_kernels]
        tmp = entry.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            tmp.mkdir(mode=0o755)
            graphs, bundled = [], []
            for i, (blob, signature) in enumerate(zip(blobs, signatures)):
                name = f"graph-{i}.bin"
                _write(tmp / name, blob)
                graphs.append({"file": name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                               "signature": signature})
            for target, data in sorted(kernels):
                name = f"kernels/{target}"
                _mkdirs((tmp / name).parent)
                _write(tmp / name, data)
                bundled.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                "target": target})
            body = json.loads(json.dumps({"component": component, "key": key, "key_hash": entry.name,
                                          "graphs": graphs, "kernels": bundled}, default=str))
            manifest = {**body, "hmac": trust.sign(secret, canonical(body))}
            _write(tmp / "manifest.json", json.dumps(manifest, indent=2).encode("utf-8"))
            old = None
            if entry.exists():
                old = entry.parent / f".old-{uuid.uuid4().hex}"
                entry.rename(old)
            tmp.rename(entry)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return entry

    # -- reading -------------------------------------------------------------------------------------

    def load(self, component: str, key: dict[str, Any]) -> Optional[Loaded]:
        """The entry's files, verified; ``None`` on a miss (``last_miss`` says why, one warning
        says what to do where it is not just absent or stale)."""
        entry = self.entry_dir(component, key)
        try:
            self._check_root()
            if not entry.is_dir():
                self.last_miss = "stale" if self._explain_miss(component, key) else "absent"
                return None
            self._check_trusted(entry.parent)
            self._check_trusted(entry)
            secret = self._secret_key()
            return self._locked(entry, lambda: self._load_entry(entry, component, key, secret))
        except Unusable as err:
            self.last_miss = err.reason
            _warn_once(str(err))
            return None
        except OSError as err:  # a folder on the way that cannot be listed or stat'ed
            self.last_miss = "unreadable"
            _warn_once(f"graph cache {self.root} cannot be read ({err}); compiling instead")
            return None

    def _load_entry(self, entry: Path, component: str, key: dict[str, Any], secret: bytes) -> Optional[Loaded]:
        if not entry.is_dir():  # replaced or quarantined while this process waited for the lock
            self.last_miss = "absent"
            return None
        try:
            return self._read(entry, component, key, secret)
        except PermissionError as err:
            raise Unusable(f"graph cache entry {entry} cannot be read ({err.strerror}); compiling instead",
                           "unreadable") from None
        except (Rejected, ManifestError, OSError, ValueError) as err:
            self.discard(entry, str(err))
            return None

    def _read(self, entry: Path, component: str, key: dict[str, Any], secret: bytes) -> Loaded:
        manifest = parse(_manifest_json(entry / "manifest.json"))
        self._verify(manifest, secret)
        if canonical(manifest.key) != canonical(key) or manifest.key_hash != entry.name or manifest.component != component:
            raise Rejected("its manifest key does not match the folder's key")
        blobs = [self._file(entry, r) for r in manifest.graphs]
        kernels = [(r.target, self._file(entry, r)) for r in manifest.kernels]
        return Loaded(blobs=blobs, signatures=[r.signature for r in manifest.graphs], path=entry, kernels=kernels)

    @staticmethod
    def _verify(manifest: Manifest, secret: bytes) -> None:
        body = {"component": manifest.component, "key": manifest.key, "key_hash": manifest.key_hash,
                "graphs": [{"file": r.file, "bytes": r.bytes, "sha256": r.sha256, "signature": r.signature}
                           for r in manifest.graphs],
                "kernels": [{"file": r.file, "bytes": r.bytes, "sha256": r.sha256, "target": r.target}
                            for r in manifest.kernels]}
        if not trust.verify(secret, canonical(body), manifest.hmac):
            raise Rejected("its signature does not match this user's key (cache.key_file): written by someone "
                           "without it, or by a machine with another key")

    @staticmethod
    def _file(entry: Path, record: FileRecord) -> bytes:
        data = _read_bounded(entry / record.file, record.bytes, limit=record.bytes)
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise Rejected(f"{record.file} is truncated or corrupt (sha256 mismatch)")
        return data

    def discard(self, entry: Path, reason: str) -> None:
        """Report a rejected entry in one line and move it to the quarantine, so the next save rebuilds it."""
        self.last_miss = "corrupt"
        where = self._quarantine(entry)
        log.warning("graph cache entry %s is unusable (%s); %s; compiling instead", entry, reason,
                    f"moved to {where}" if where else "left in place (the cache folder is read-only)")

    def _quarantine(self, entry: Path) -> Optional[Path]:
        folder = self.root / QUARANTINE
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = folder / f"{entry.parent.name}-{entry.name}-{stamp}-{uuid.uuid4().hex[:6]}"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            entry.rename(dest)
        except OSError:
            return None
        try:
            kept = sorted(folder.iterdir(), key=lambda p: p.lstat().st_mtime, reverse=True)
            for old in kept[QUARANTINE_KEEP:]:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
        return dest

    def _explain_miss(self, component: str, key: dict[str, Any]) -> bool:
        """Say which key fields differ from the nearest entry of the same component, if any."""
        nearest: Optional[list[str]] = None
        folder = self.root / component
        try:
            manifests = list(folder.glob("*/manifest.json")) if folder.is_dir() else []
        except OSError:
            return False
        for manifest in manifests:
            try:
                other = _manifest_json(manifest)["key"]
                if not isinstance(other, dict):
                    continue
            except (OSError, ValueError, KeyError, TypeError, Rejected):
                continue
            diff = _differences(other, key)
            if nearest is None or len(diff) < len(nearest):
                nearest = diff
        if nearest:
            log.warning("graph cache: no %s entry for this key (nearest entry differs in %s); compiling",
                        component, "; ".join(nearest))
        return bool(nearest)
