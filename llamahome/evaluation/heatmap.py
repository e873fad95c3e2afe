"""Depth x length accuracy heat-maps from result rows (``task=niah``, ``task=passkey``).

A row holds one accuracy per cell as ``accuracy@<length>_d<depth>``; :func:`grid` reads them back
and :func:`draw` renders them (matplotlib, Agg) with the depth down the side, the length along
the bottom, and the value written in each cell.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_CELL = re.compile(r"^accuracy@(\d+)_d([0-9.]+)$")


def grid(row: Mapping[str, Any]) -> tuple[list[int], list[float], list[list[float]]] | None:
    """Return (lengths, depths, values[depth][length]) of a row's cells, or None if it has none."""
    cells: dict[tuple[int, float], float] = {}
    for key, value in row.items():
        match = _CELL.match(key)
        if match and isinstance(value, int | float):
            cells[(int(match.group(1)), float(match.group(2)))] = float(value)
    if not cells:
        return None
    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    values = [[cells.get((length, d), float("nan")) for length in lengths] for d in depths]
    return lengths, depths, values


def file_name(row: Mapping[str, Any]) -> str:
    """``heatmap_<task>_<protocol>_<policy>_<budget>.png`` for a row (safe characters only)."""
    parts = [row.get("task"), row.get("protocol"), row.get("policy"), row.get("budget")]
    text = "_".join(str(p) for p in parts if p not in (None, ""))
    return "heatmap_" + re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-") + ".png"


def draw(row: Mapping[str, Any], path: str | Path) -> Path | None:
    """Draw a row's depth x length accuracy grid to `path` (PNG); None when it has no grid."""
    found = grid(row)
    if found is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    lengths, depths, values = found
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.6, 0.55 * len(depths) + 1.8))
    image = ax.imshow(values, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            text = "-" if value != value else f"{value:.2f}"  # NaN: cell not run
            dark = value == value and not 0.2 < value < 0.8  # white on the dark ends of the map
            ax.text(
                j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black"
            )
    fig.colorbar(image, ax=ax, label="accuracy")
    budget = row.get("budget") or ""
    protocol = str(row.get("protocol") or "").replace("_", " ")
    title = f"{row.get('task')}: {row.get('policy')} {budget}".strip()
    subtitle = ", ".join(str(p) for p in (row.get("model"), protocol) if p)
    ax.set_title(f"{title}\n{subtitle}".strip(), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
