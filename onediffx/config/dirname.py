"""Run-folder names built from override values, made safe to use as one path component.

Hydra names a run's folder after its overrides (``hydra.job.override_dirname``), so a value such as
``model.pretrained=../../tmp/x`` would otherwise climb out of ``outputs/``, and a long list
(``warmup.shapes`` with 14 entries) would exceed the file system's 255-byte limit on a name. The
``onediffx.dirname`` resolver, used by ``conf/*.yaml``'s ``hydra.run.dir`` and sweep ``subdir``,
keeps names readable where they can be and unique where they are cut (a hash of the full text).
"""

from __future__ import annotations

import hashlib
import re

from omegaconf import OmegaConf

MAX_CHARS = 100
"""Leaves room for the timestamp and job-number prefixes within a 255-byte name."""
UNSAFE = re.compile(r"[^A-Za-z0-9._,=+@-]+")


def safe_dirname(text: str, max_chars: int = MAX_CHARS) -> str:
    """One path component: no separators, no ``..``, no leading dot, at most ``max_chars`` characters."""
    name = UNSAFE.sub("_", str(text))
    name = re.sub(r"\.{2,}", "_", name).lstrip(".")
    if len(name) <= max_chars and name == text:
        return name
    digest = hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{name[:max_chars - len(digest) - 1]}-{digest}"


def register_resolver() -> None:
    """Make ``${onediffx.dirname:...}`` available to the configs Hydra composes."""
    if not OmegaConf.has_resolver("onediffx.dirname"):
        OmegaConf.register_new_resolver("onediffx.dirname", safe_dirname)
