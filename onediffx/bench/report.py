"""Writing bench results: ``bench.json`` (everything) and ``bench.md`` (one table per scenario)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..metrics import write_json


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    """One markdown table per scenario, columns in first-seen order."""
    out = []
    for scenario in dict.fromkeys(r.get("scenario", "") for r in rows):
        group = [r for r in rows if r.get("scenario", "") == scenario]
        columns = [c for c in dict.fromkeys(k for r in group for k in r) if c != "scenario"]
        out += [f"### {scenario}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        out += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in group]
        out.append("")
    return "\n".join(out)


def write_report(out_dir: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    write_json(out_dir / "bench.json", {**header, "rows": rows})
    text = f"{header['device_name']}, torch {header['versions'].get('torch')}, model {header['model']} " \
           f"(synthetic={header['synthetic']}), {header['height']}x{header['width']}, {header['steps']} steps\n\n" \
           + markdown(rows)
    (out_dir / "bench.md").write_text(text, encoding="utf-8")
    return text
