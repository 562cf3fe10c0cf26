"""The tested version range of what onediffx runs on, checked once, without importing the packages.

An older diffusers or torch fails deep inside a compile or a LoRA load with an error that names
neither; checking the installed versions (``importlib.metadata``, no import of torch) turns that
into one line: which package, which version is installed, which is needed, and the pip command.
The minimums are what ``make test-compat`` tests (``.ci/compat-check``); pyproject.toml says the same.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

from .errors import OnediffxError

MINIMUMS = {"torch": "2.11", "diffusers": "0.35", "transformers": "4.44", "peft": "0.17", "safetensors": "0.4.1",
            "hydra-core": "1.3.2", "omegaconf": "2.3"}
PAIRS = [("transformers", "5", "peft", "0.18")]
"""``(a, from, b, needs)``: with ``a >= from`` installed, ``b`` must be ``>= needs`` (pip does not know:
peft 0.17 imports what transformers 5 removed; peft 0.18 needs transformers 5's modules)."""


class RequirementError(OnediffxError, ImportError):
    """An installed package is older than onediffx's tested minimum (or missing)."""


def problems(minimums: Optional[dict[str, str]] = None) -> list[str]:
    """One phrase per package that is missing or below its minimum (``MINIMUMS`` by default)."""
    found = []
    for name, minimum in (MINIMUMS if minimums is None else minimums).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            found.append(f"{name} is not installed (needs >= {minimum})")
            continue
        if Version(installed).release < Version(minimum).release:
            found.append(f"{name} {installed} is older than {minimum}")
    if minimums is None:
        found += _pair_problems()
    return found


def _installed(name: str) -> Optional[Version]:
    try:
        return Version(version(name))
    except PackageNotFoundError:
        return None


def _pair_problems() -> list[str]:
    found = []
    for first, since, second, needs in PAIRS:
        a, b = _installed(first), _installed(second)
        if a and b and a.release >= Version(since).release and b.release < Version(needs).release:
            found.append(f"{second} {b} is older than {needs}, which {first} {a} needs")
    return found


@lru_cache(maxsize=1)
def check() -> None:
    """Raise ``RequirementError`` naming every package below its minimum; cached, so it runs once."""
    found = problems()
    if found:
        needs = {**MINIMUMS, **{second: need for _, _, second, need in PAIRS}}
        pins = " ".join(f"'{n}>={needs[n]}'" for n in needs if any(p.startswith(n + " ") for p in found))
        raise RequirementError(f"onediffx needs newer packages: {'; '.join(found)}; pip install -U {pins}")
