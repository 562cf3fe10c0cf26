"""``summary.png``: latency against fidelity, one labelled point per job.

The question a sweep answers is a trade-off (faster, but how different?), so the plot puts each job
where it lands on both axes. PSNR is infinite for images identical to the baseline's; those points
sit on a dashed "identical" line above the finite ones instead of being dropped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .summary import Summary


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_tradeoff(path: Path, summary: "Summary") -> None:
    """Write the figure; jobs without a latency (failed) or without comparable images are listed, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .summary import label

    rows = [r for r in summary.rows if r.ok and r.metric("latency_per_image_s") is not None]
    compared = [r for r in rows if r.psnr_db is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), squeeze=False)
    psnr_ax, ssim_ax = axes[0]
    finite = [r.psnr_db for r in compared if not math.isinf(r.psnr_db)]
    top = (max(finite) if finite else 40.0) + 5.0
    for row in compared:
        x = row.metric("latency_per_image_s")
        style = dict(marker="*", s=160, color="tab:red") if row.baseline else dict(marker="o", s=50, color="tab:blue")
        text = _short(f"#{row.num} {label(row, summary.common)}")
        for ax, y in ((psnr_ax, top if math.isinf(row.psnr_db) else row.psnr_db), (ssim_ax, row.ssim)):
            ax.scatter([x], [y], zorder=3, **style)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    psnr_ax.axhline(top, linestyle="--", color="grey", linewidth=0.8)
    psnr_ax.text(0.01, top, " identical", transform=psnr_ax.get_yaxis_transform(), va="bottom", fontsize=8, color="grey")
    psnr_ax.set_ylabel("PSNR vs baseline (dB)")
    ssim_ax.set_ylabel("SSIM vs baseline")
    for ax in (psnr_ax, ssim_ax):
        ax.set_xlabel("latency per image (s)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.15)  # room for the labels
    left_out = [r.num for r in summary.rows if r not in compared]
    base = summary.baseline
    title = f"baseline: job {base.num} ({_short(label(base, summary.common), 60)})" if base else "no baseline"
    if left_out:
        title += f"; not drawn (failed or no image to compare): jobs {left_out}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
