"""A sweep's plot: quality against KV budget, one line per policy, one panel per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llamahome.evaluation.results import POLICY_ORDER, labelled, sort_rows
from llamahome.evaluation.sweep_tables import budget_of, finite, full_values


def plot(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Quality against KV budget, one line per policy, the full cache as a horizontal line.

    Args:
        rows: Result rows (any number of tasks: one panel each).
        path: The PNG to write.
        title: A figure title (default: the model names).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    rows = sort_rows(labelled(rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(
        1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4), squeeze=False
    )
    full = full_values(rows)
    colors = {"h2o": "tab:red", "sink": "tab:green", "window": "tab:blue"}
    for ax, task in zip(axes[0], tasks, strict=False):
        task_rows = [r for r in rows if r["task"] == task]
        for policy in [p for p in POLICY_ORDER if p != "full"] + sorted(
            {r["policy"] for r in task_rows} - set(POLICY_ORDER)
        ):
            points = sorted(
                (budget_of(r), float(r["value"]))
                for r in task_rows
                if r["policy"] == policy and budget_of(r) is not None and finite(r.get("value"))
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=policy, color=colors.get(policy))
        if task in full:
            ax.axhline(
                full[task], color="black", linestyle="--", label=f"full cache ({full[task]:.4g})"
            )
        metric = task_rows[0]["metric"]
        better = "higher" if task_rows[0].get("higher_is_better") else "lower"
        ax.set_title(f"{task}: {metric} ({better} is better)")
        ax.set_xlabel("KV budget (share of tokens kept)")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.3)
        ax.legend()
    models = ", ".join(dict.fromkeys(str(r.get("model")) for r in rows))
    fig.suptitle(title or f"Quality vs KV budget: {models}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
