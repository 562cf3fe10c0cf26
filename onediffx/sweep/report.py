"""The three files a sweep leaves at its root: ``summary.csv``, ``summary.md``, ``summary.png``.

The CSV keeps full-precision numbers (the jobs' own, for further analysis); the Markdown table rounds
them for reading; the plot shows the trade-off at a glance.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

from .plot import plot_tradeoff
from .summary import JobRow, Summary, is_identical, label, summarize

COLUMNS = [
    "job", "overrides", "status", "baseline", "latency_per_image_s", "it_per_s", "speedup", "psnr_db", "ssim",
    "images_compared", "peak_memory_gib", "startup_s", "compile", "graph_cache", "device", "error", "all_overrides",
    "dir",
]


def _record(row: JobRow, summary: Summary, sweep_dir: Path) -> dict[str, Any]:
    return {
        "job": row.num,
        "overrides": label(row, summary.common),
        "status": row.status,
        "baseline": row.baseline,
        "latency_per_image_s": row.metric("latency_per_image_s"),
        "it_per_s": row.metric("it_per_s"),
        "speedup": row.speedup,
        "psnr_db": row.psnr_db,
        "ssim": row.ssim,
        "images_compared": row.images_compared,
        "peak_memory_gib": row.metric("peak_memory_gib"),
        "startup_s": row.startup.get("seconds"),
        "compile": row.startup.get("compile"),
        "graph_cache": row.startup.get("graph_cache"),
        "device": row.metric("device"),
        "error": row.error,
        "all_overrides": " ".join(row.overrides),
        "dir": str(row.path.relative_to(sweep_dir)),
    }


def write_csv(path: Path, summary: Summary, sweep_dir: Path) -> None:
    """Numbers at full precision (``repr``), empty cells where a value does not apply."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in summary.rows:
            record = _record(row, summary, sweep_dir)
            writer.writerow({k: "" if v is None else v for k, v in record.items()})


def _num(value: Optional[float], digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def _psnr(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "identical" if is_identical(value) else f"{value:.2f}"


def write_markdown(path: Path, summary: Summary, sweep_dir: Path) -> None:
    base = summary.baseline
    lines = [f"# Sweep summary: {sweep_dir}", ""]
    lines.append(f"Baseline: job {base.num} ({label(base, summary.common)})" if base else "Baseline: none")
    if summary.common:
        lines.append(f"Common overrides: `{' '.join(summary.common)}`")
    lines += [f"Note: {note}" for note in summary.notes]
    lines += [
        "",
        "| job | overrides | status | latency/image (s) | it/s | speed-up | PSNR (dB) | SSIM | peak mem (GiB) "
        "| start-up (s) | compile | graph cache |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in summary.rows:
        status = row.status + (" (baseline)" if row.baseline else "")
        if not row.ok:
            status = f"failed: {row.error}".replace("|", "\\|")
        speedup = "-" if row.speedup is None else f"{row.speedup:.2f}x"
        lines.append(
            f"| {row.num} | `{label(row, summary.common)}` | {status} | {_num(row.metric('latency_per_image_s'))} "
            f"| {_num(row.metric('it_per_s'))} | {speedup} | {_psnr(row.psnr_db)} | {_num(row.ssim, 4)} "
            f"| {_num(row.metric('peak_memory_gib'))} | {_num(row.startup.get('seconds'))} "
            f"| {row.startup.get('compile') or '-'} | {row.startup.get('graph_cache') or '-'} |"
        )
    lines += ["", "PSNR and SSIM compare each job's images with the baseline's images of the same prompt and seed.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_summary(sweep_dir: Path, baseline: Optional[str] = None) -> Summary:
    """Summarise the jobs under ``sweep_dir`` and write the three files there."""
    summary = summarize(sweep_dir, baseline)
    write_csv(sweep_dir / "summary.csv", summary, sweep_dir)
    write_markdown(sweep_dir / "summary.md", summary, sweep_dir)
    plot_tradeoff(sweep_dir / "summary.png", summary)
    return summary

