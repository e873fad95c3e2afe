"""A sweep's tables: the markdown per task, h2o against window, and the number formats.

``markdown_table(rows)`` renders a sweep's rows (``results.md``): a table per task (metric, change
against the full cache, KV bytes held, keep ratio, tok/s), how much of window's gap to the full
cache h2o closes, and per task and policy the smallest budget that stays within 5% of full
(``results.min_budget_table``). ``report.py`` writes it; ``quality_table.py`` reuses the helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from llamahome.evaluation.results import labelled, min_budget_table, sort_rows

MIB = 2**20


def budget_of(row: Mapping[str, Any]) -> float | None:
    """Return a row's x value: the requested budget ratio, else the measured KV share."""
    ratio = row.get("budget_ratio")
    if ratio is not None:
        return float(ratio)
    share = row.get("kv_ratio")
    return float(share) if share is not None and row.get("policy") != "full" else None


def distinct(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows without repeats of the same effective config (cache=full at every budget)."""
    seen: set[tuple[Any, Any]] = set()
    out = []
    for row in rows:
        key = (row.get("task"), row.get("config_hash"))
        if row.get("policy") == "full" and row.get("config_hash"):
            if key in seen:
                continue
            seen.add(key)
        out.append(dict(row))
    return out


def full_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Return the full-cache value of each task (the mean when several full rows exist)."""
    found: dict[str, list[float]] = {}
    for row in rows:
        if row.get("policy") == "full" and finite(row.get("value")):
            found.setdefault(row["task"], []).append(float(row["value"]))
    return {task: sum(v) / len(v) for task, v in found.items()}


def gap_closed(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per task and budget: how much closer h2o is to the full cache than window is.

    ``closer = 1 - loss(h2o) / loss(window)``, a loss being how much worse than full a policy
    scores (1 = h2o loses nothing, 0 = it loses as much as window, negative = more; left out when
    window loses nothing), h2o's and sink's change against full, and whether
    sink beats h2o (reported, not hidden: it happens on small models at small budgets).
    """
    full = full_values(rows)
    higher = {r["task"]: bool(r.get("higher_is_better")) for r in rows}
    cells: dict[tuple[str, float], dict[str, float]] = {}
    for row in rows:
        budget = row.get("budget_ratio")
        if (
            row.get("policy") in ("h2o", "window", "sink")
            and budget is not None
            and finite(row.get("value"))
        ):
            cells.setdefault((row["task"], float(budget)), {})[row["policy"]] = float(row["value"])
    out = []
    for (task, budget), values in sorted(cells.items()):
        if task not in full or "h2o" not in values:
            continue
        base = full[task]
        entry: dict[str, Any] = {"task": task, "budget_ratio": budget, "full": base}
        entry.update(values)
        entry["h2o_vs_full"] = relative(values["h2o"], base)
        # Loss against full, positive = worse, whichever direction the metric improves in.
        sign = -1.0 if higher[task] else 1.0
        window_loss = sign * (values["window"] - base) if "window" in values else 0.0
        if window_loss > 0:  # otherwise window lost nothing, and there is no gap to close
            h2o_loss = max(0.0, sign * (values["h2o"] - base))
            entry["h2o_closer_than_window"] = 1 - h2o_loss / window_loss
        if "sink" in values:
            entry["sink_vs_full"] = relative(values["sink"], base)
            sink, h2o = values["sink"], values["h2o"]
            entry["sink_beats_h2o"] = sink > h2o if higher[task] else sink < h2o
        out.append(entry)
    return out


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render the sweep as markdown: a table per task, the h2o-vs-window lines, min budgets."""
    rows = distinct(sort_rows(labelled(rows)))
    full = full_values(rows)
    lines: list[str] = []
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        metric = task_rows[0]["metric"]
        better = "higher" if task_rows[0].get("higher_is_better") else "lower"
        model = ", ".join(dict.fromkeys(str(r.get("model")) for r in task_rows))
        extras = _extra_columns(task_rows)
        head = f"| policy | budget | {metric} | vs full | " + "".join(f"{k} | " for k in extras)
        lines += [
            f"### {task} ({metric}, {better} is better; model {model})",
            "",
            head + "KV held MiB | KV vs full | keep | tok/s | wall s | note |",
            "|---|---|---:|---:|" + "---:|" * len(extras) + "---:|---:|---:|---:|---:|---|",
        ]
        for r in task_rows:
            change = relative(r.get("value"), full.get(task)) if task in full else None
            cells = [
                r.get("policy"),
                r.get("budget"),
                num(r.get("value")),
                pct(change, signed=True),
                *(num(r.get(k)) for k in extras),
                num((r.get("kv_bytes") or 0) / MIB),
                pct(r.get("kv_ratio")),
                pct(r.get("keep_ratio")),
                num(r.get("tok_s")),
                num(r.get("wall_s")),
                r.get("note") or "",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    comparisons = gap_closed(rows)
    if comparisons:
        lines.append("H2O against the full cache and the window at the same budget:")
        lines.append("")
        for c in comparisons:
            h2o = pct(c["h2o_vs_full"], signed=True)
            text = f"- {c['task']} @ {c['budget_ratio']:.0%}: h2o {h2o} vs full"
            if "h2o_closer_than_window" in c:
                text += f", {pct(c['h2o_closer_than_window'])} closer to full than window"
            if "sink_vs_full" in c:
                text += f"; sink {pct(c['sink_vs_full'], signed=True)} vs full"
                text += " (sink beats h2o here)" if c["sink_beats_h2o"] else ""
            lines.append(text)
        lines.append("")
    lines += min_budget_table(rows)
    return "\n".join(lines)


def _extra_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Task metrics besides the headline: accuracy per length/depth, ROUGE-1/2/L, RULER recall."""
    keys = dict.fromkeys(k for r in rows for k in r)
    metric = rows[0].get("metric")
    rouge = ("rouge1", "rouge2", "rougeL")
    cells = [k for k in keys if k.startswith("accuracy@") and "_d" in k]
    wanted = [
        k
        for k in keys
        if k.startswith("accuracy@") or k in rouge or (k.startswith("recall:") and "@" not in k)
    ]
    # A heat-map's cells (niah) are drawn as PNGs; the table keeps the per-length columns.
    return [k for k in wanted if k != metric and not (len(cells) > 6 and k in cells)]


def finite(value: Any) -> bool:
    """Whether `value` is a finite number."""
    return isinstance(value, int | float) and math.isfinite(value)


def relative(value: Any, base: Any) -> float | None:
    """(value - base) / |base|, or None when either is missing or base is 0."""
    if not (finite(value) and finite(base)) or base == 0:
        return None
    return (float(value) - float(base)) / abs(float(base))


def num(value: Any) -> str:
    """A number in 4 significant digits (large ones whole), "-" when missing."""
    if not finite(value):
        return "-"
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def pct(value: Any, signed: bool = False) -> str:
    """A share as a percentage (signed: +1.5%), "-" when missing."""
    if not finite(value):
        return "-"
    return f"{value:+.1%}" if signed else f"{value:.0%}"
