"""Who may have written a cache folder, and a signature only this user's key can make.

A graph file is a pickle (as Inductor's own caches are) and a bundled kernel is native code:
loading an entry runs whatever its writer put there. The manifest's sha256 sums catch damage,
not an attacker, who can rewrite them too. So:

* a cache folder that others can write (group/other write bit, or owned by another user than
  this one or root) is refused unless ``cache.trusted=true``;
* every manifest carries an HMAC-SHA256 over its whole content (key, file sizes and sha256s)
  made with a per-user secret (``cache.key_file``, created 0600 on first use). A writer without
  that secret cannot make an entry this process will load. Machines that share one cache folder
  share the key file too (``ONEDIFFX_CACHE_KEY`` or ``cache.key_file``).
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import uuid
from hashlib import sha256
from pathlib import Path
from typing import Optional

KEY_ENV = "ONEDIFFX_CACHE_KEY"
KEY_BYTES = 32


class TrustError(Exception):
    """The folder or key cannot be trusted or used; the message is one line with the fix."""


def default_key_file() -> Path:
    """``$ONEDIFFX_CACHE_KEY``, else ``$HOME/.config/onediffx/graph-cache.key`` (``cache.key_file``'s
    default too, so the CLI and the Python API sign with one key).

    Kept apart from the cache folder on purpose: whoever can write a shared cache volume should
    not be able to read the secret that signs it.
    """
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    return Path(os.environ.get("HOME", ".")) / ".config" / "onediffx" / "graph-cache.key"


def untrusted_reason(path: Path) -> Optional[str]:
    """Why others could have written ``path`` (a folder of the cache), or ``None``."""
    info = path.stat()
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by {'others' if info.st_mode & stat.S_IWOTH else 'its group'}"
    if info.st_uid not in (os.geteuid(), 0):
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()}) or root"
    return None


def load_secret(path: Path, *, create: bool) -> Optional[bytes]:
    """The signing secret in ``path``; created (0600, atomically) when absent and ``create``."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if not create:
            return None
        return _create_secret(path)
    except OSError as err:
        raise TrustError(f"cache.key_file {path} cannot be read ({err.strerror}); point cache.key_file at a file of yours") from None
    if not stat.S_ISREG(info.st_mode):
        raise TrustError(f"cache.key_file {path} is not a file; remove it or point cache.key_file elsewhere")
    if info.st_mode & 0o077:
        raise TrustError(f"cache.key_file {path} is readable or writable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                         f"run `chmod 600 {path}`")
    if info.st_uid not in (os.geteuid(), 0):
        raise TrustError(f"cache.key_file {path} belongs to uid {info.st_uid}, not to this user; use a key file of yours")
    try:
        text = path.read_text(encoding="ascii").strip()
        secret = bytes.fromhex(text)
    except (OSError, ValueError, UnicodeDecodeError):
        raise TrustError(f"cache.key_file {path} is not a hex key written by onediffx; remove it to make a new one") from None
    if len(secret) < 16:
        raise TrustError(f"cache.key_file {path} holds a key shorter than 16 bytes; remove it to make a new one")
    return secret


def _create_secret(path: Path) -> bytes:
    """Write a new secret under a temporary name and link it into place: two processes starting
    at once agree on one key, and no reader sees a half-written file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink()
    except OSError as err:
        raise TrustError(f"cache.key_file {path} cannot be created ({err.strerror}); "
                         f"set cache.key_file (or {KEY_ENV}) to a writable place") from None
    return load_secret(path, create=False)  # type: ignore[return-value]


def sign(secret: bytes, text: str) -> str:
    return hmac.new(secret, text.encode("utf-8"), sha256).hexdigest()


def verify(secret: bytes, text: str, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, text), signature)
