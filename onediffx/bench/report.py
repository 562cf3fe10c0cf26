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


def title(header: dict[str, Any]) -> str:
    """The record's provenance in two lines: what was run where, and from which commit."""
    alone = {True: "the GPU to itself", False: "the GPU SHARED with another process", None: "GPU sharing not known"}
    return (f"{header['device_name']}, torch {header['versions'].get('torch')}, model {header['model']} "
            f"(synthetic={header['synthetic']}), {header['height']}x{header['width']}, {header['steps']} steps\n"
            f"{header.get('time_utc')}, commit {header.get('commit')}{' (modified)' if header.get('dirty') else ''}, "
            f"{alone[header.get('gpu_alone')]}{', headline' if header.get('headline') else ''}\n")


def write_report(out_dir: Path, header: dict[str, Any], rows: list[dict[str, Any]], stem: str = "bench") -> str:
    """``<stem>.json`` (everything) and ``<stem>.md``; returns the markdown."""
    write_json(out_dir / f"{stem}.json", {**header, "rows": rows})
    text = title(header) + "\n" + markdown(rows)
    (out_dir / f"{stem}.md").write_text(text, encoding="utf-8")
    return text
