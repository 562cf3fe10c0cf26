"""``python -m onediffx list``: what a config can select, read from ``conf/`` and the registries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .. import stages as _builtin_stages  # noqa: F401  (registers the built-in stages)
from ..plugin_loader import first_party_plugins, installed_plugins, load_all_plugins
from ..registry import BACKENDS, STAGES
from ..resources import conf_dir


def _group(conf_dir: Path, group: str) -> dict[str, Any]:
    folder = conf_dir / group
    return {p.stem: OmegaConf.load(p) for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def _first_comment(path: Path) -> str:
    lines = [l[2:].strip() for l in path.read_text(encoding="utf-8").splitlines() if l.startswith("# ")]
    return next((l for l in lines if not l.startswith("@package")), "")


def catalogue(conf_dir: Path) -> dict[str, dict[str, str]]:
    """Every selectable entry with a one-line description, by kind."""
    from ..compile import backends  # noqa: F401  (registers the built-in backends)

    load_all_plugins()
    models = {
        name: f"{m.get('pipeline')}  " + (f"builtin:{m.builtin}" if m.get("builtin") else str(m.get("pretrained")))
        + (f"  synthetic arch: {m.arch}" if m.get("arch") else "")
        for name, m in _group(conf_dir, "model").items()
    }
    loras = {}
    for name, entry in _group(conf_dir, "lora").items():
        entry = entry.lora.get(name, entry) if "lora" in entry else entry
        loras[name] = f"{entry.get('source')}  {entry.get('weight_name') or ''}  base={entry.get('base')}"
    stages = {name: (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else cls.__module__
              for name, cls in STAGES.items()}
    return {
        "models": models,
        "stages": stages,
        "compile backends": {name: (fn.__doc__ or "").strip().split("\n")[0] for name, fn in BACKENDS.items()},
        "compile presets": {n: str(dict(c)) for n, c in _group(conf_dir, "compile").items()},
        "deepcache presets": {n: str(dict(c)) for n, c in _group(conf_dir, "deepcache").items()},
        "loras": loras,
        "launch presets": {p.stem: _first_comment(p) for p in sorted((conf_dir / "launch").glob("*.yaml"))},
        "plugins": {**{n: "first-party (onediffx.plugins)" for n in first_party_plugins()},
                    **{n: f"entry point {ep.value}" for n, ep in installed_plugins().items()}},
    }


def print_catalogue() -> dict[str, dict[str, str]]:
    found = catalogue(conf_dir())
    for kind, entries in found.items():
        print(f"{kind}:")
        width = max((len(n) for n in entries), default=0)
        for name, text in entries.items():
            print(f"  {name.ljust(width)}  {text}")
    return found
