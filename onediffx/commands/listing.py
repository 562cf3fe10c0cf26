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


def _description(path: Path, width: int = 110) -> str:
    """The first sentence of a config file's leading comment block (what ``list`` shows for a preset)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith("@package"):
            lines.append(text)
    text = " ".join(lines)
    end = text.find(". ")
    text = text if end < 0 else text[: end + 1]
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _descriptions(conf_dir: Path, group: str) -> dict[str, str]:
    return {p.stem: _description(p) for p in sorted((conf_dir / group).glob("*.yaml"))}


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
        "compile presets": _descriptions(conf_dir, "compile"),
        "deepcache presets": _descriptions(conf_dir, "deepcache"),
        "loras": loras,
        "launch presets": _descriptions(conf_dir, "launch"),
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
