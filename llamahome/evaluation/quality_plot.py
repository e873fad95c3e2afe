"""The quality preset's plot: each task's score against the achieved keep ratio, per policy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llamahome.evaluation.quality_table import QualityTable
from llamahome.evaluation.sweep_tables import finite, num

__all__ = ["plot_quality"]


def plot_quality(table: QualityTable, rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Each task's score against the achieved keep ratio, one line per policy (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    cells = table.cells
    cols = min(3, max(1, len(cells)))
    lines = math.ceil(max(1, len(cells)) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(5.2 * cols, 4 * lines), squeeze=False)
    full = next((r for r in table.rows if r["policy"] == "full"), {})
    for ax, cell in zip(axes.flat, cells, strict=False):
        for policy in dict.fromkeys(r["policy"] for r in table.rows if r["policy"] != "full"):
            points = sorted(
                (r["keep_ratio"], r[cell.key])
                for r in table.rows
                if r["policy"] == policy and finite(r.get(cell.key)) and finite(r.get("keep_ratio"))
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=policy)
        if finite(full.get(cell.key)):
            base = float(full[cell.key])
            ax.axhline(base, color="black", linestyle="--", label=f"full ({num(base)})")
            band = base * (1 - table.tolerance if cell.higher_is_better else 1 + table.tolerance)
            ax.axhline(band, color="grey", linestyle=":", label=f"{table.tolerance:.0%} from full")
        better = "higher" if cell.higher_is_better else "lower"
        ax.set_title(f"{cell.label}: {cell.metric} ({better} is better)")
        ax.set_xlabel("achieved keep ratio (tokens held / seen)")
        ax.set_ylabel(cell.metric)
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(cells) :]:
        ax.axis("off")
    models = ", ".join(dict.fromkeys(str(r.get("model")) for r in rows))
    fig.suptitle(f"Quality vs keep ratio: {models}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
