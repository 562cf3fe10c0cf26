"""One process per output folder.

Two batch runs on one folder (or two ``resume=true`` runs after a kill) would each generate every
pending line and append it to the manifest: all work done twice, with nothing to say so. The
folder's lock is an ``flock`` on ``<folder>/.onediffx.lock``: the kernel drops it when its holder
dies, even by ``kill -9``, so a crashed run never leaves the folder locked. A second run fails at
start with the holder's pid.

Hydra writes ``.hydra/`` into the folder before any job code runs, so a refused second run has
already overwritten the holder's ``.hydra/*.yaml``; the holder puts its own back when it releases.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import BusyError

LOCK_NAME = ".onediffx.lock"


def _acquire(path: Path) -> int:
    """An fd holding the lock on ``path``, or ``BusyError`` naming the holder."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise BusyError(
                f"output folder {path.parent} is in use by another onediffx run (pid {holder}); "
                "wait for it to finish, or choose another hydra.run.dir"
            ) from None
        try:  # the holder before us may have unlinked the file after we opened it: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _hydra_files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (folder / ".hydra").glob("*.yaml")} if (folder / ".hydra").is_dir() else {}


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this process: a second holder fails at once with ``BusyError``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _acquire(path)
    ours = _hydra_files(folder)
    try:
        yield
    finally:
        for file, data in ours.items():  # undo a refused run's .hydra/ over ours
            try:
                if file.read_bytes() != data:
                    file.write_bytes(data)
            except OSError:
                pass
        os.unlink(path)  # while still locked: whoever opened it meanwhile retries on the new file
        os.close(fd)
