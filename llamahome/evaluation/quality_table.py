"""The quality preset's one table and its plot, from a sweep's result rows.

One row per policy and budget (the full cache once), one column group per task and protocol
(streaming perplexity; the RULER-style suite per length and overall, question protected ``QP``
and compressed ``QC``; passkey), each cell the score and its share of the full cache's; then the
time against the full cache and the smallest budget from which the policy stays within 5% of the
full cache on every task. ``quality.csv`` has the same table as plain numbers; ``quality.png``
draws each task's score against the achieved keep ratio (``llamahome.kvcache.keep_ratio``,
recorded in each row), one line per policy, the full cache dashed, the 5% band dotted.

    python -m llamahome.evaluation.quality_table <sweep dir>   # rebuild from the job rows
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamahome.evaluation.results import POLICY_ORDER, collect_rows, within
from llamahome.evaluation.sweep_tables import finite, num, pct

MARKDOWN = "quality.md"
CSV = "quality.csv"
PLOT = "quality.png"
_PROTOCOL = {"question_protected": "QP", "question_compressed": "QC"}
_TASK_ORDER = ("streaming_ppl", "ruler", "passkey")

__all__ = ["QualityTable", "build_table", "markdown", "write_quality_report"]


@dataclass
class Cell:
    """One task under one protocol: a column group of the table."""

    key: str  # "ruler_qp", "streaming_ppl"
    label: str  # "ruler QP", "ppl"
    metric: str
    higher_is_better: bool
    lengths: list[str] = field(default_factory=list)  # "1024", ... (per-length columns)


@dataclass
class QualityTable:
    """The table: its cells (column groups) and rows (dicts of plain numbers, CSV-ready)."""

    cells: list[Cell]
    rows: list[dict[str, Any]]
    tolerance: float
    missing: list[str] = field(default_factory=list)


def cell_of(row: Mapping[str, Any]) -> str:
    """A row's column group: ``streaming_ppl``, ``ruler_qp``, ``passkey_qc``..."""
    short = _PROTOCOL.get(str(row.get("protocol")))
    return f"{row['task']}_{short.lower()}" if short else str(row["task"])


def _cells(rows: Sequence[Mapping[str, Any]]) -> list[Cell]:
    found: dict[str, Cell] = {}
    for row in rows:
        key = cell_of(row)
        if key not in found:
            short = _PROTOCOL.get(str(row.get("protocol")))
            label = "ppl" if row["task"] == "streaming_ppl" else str(row["task"])
            found[key] = Cell(
                key,
                f"{label} {short}" if short else label,
                str(row.get("metric")),
                bool(row.get("higher_is_better")),
            )
        prefix = f"{row.get('metric')}@"
        for name in row:
            if name.startswith(prefix) and "_d" not in name:
                length = name[len(prefix) :]
                if length not in found[key].lengths:
                    found[key].lengths.append(length)
    for cell in found.values():
        cell.lengths.sort(key=int)
        if len(cell.lengths) < 2:
            cell.lengths = []  # one length: the headline is that length

    def order(cell: Cell) -> tuple:
        task, _, protocol = cell.key.rpartition("_q") if "_q" in cell.key else (cell.key, "", "")
        rank = _TASK_ORDER.index(task) if task in _TASK_ORDER else len(_TASK_ORDER)
        return (rank, task, protocol != "p")  # question protected first

    return sorted(found.values(), key=order)


def _share(value: Any, full: Any, higher: bool) -> float | None:
    """Higher-is-better: value / full; lower-is-better: the relative change (+7.9% = 0.079)."""
    if not (finite(value) and finite(full)) or full == 0:
        return None
    return value / full if higher else (value - full) / abs(full)


def build_table(
    rows: Sequence[Mapping[str, Any]],
    policies: Sequence[str] | None = None,
    tolerance: float = 0.05,
) -> QualityTable:
    """Turn a sweep's result rows into the quality table.

    Args:
        rows: Result rows (``results.jsonl`` of every job).
        policies: The preset's policy list, for the row order and the "not measured" notes.
        tolerance: "Within 5% of full": at most this much (relative) worse than full.

    Returns:
        The table; ``missing`` names listed policies without any row.
    """
    rows = [dict(r) for r in rows if finite(r.get("value"))]
    cells = _cells(rows)
    groups: dict[tuple[str, float | None], dict[str, dict[str, Any]]] = {}
    for row in rows:
        budget = None if row["policy"] == "full" else row.get("budget_ratio")
        groups.setdefault((row["policy"], budget), {}).setdefault(cell_of(row), row)
    full = next((g for (p, _), g in groups.items() if p == "full"), {})
    order = list(policies or []) + [p for p in POLICY_ORDER if p not in (policies or [])]

    def rank(key: tuple[str, float | None]) -> tuple:
        policy, budget = key
        at = order.index(policy) if policy in order else len(order)
        return (policy != "full", at, policy, budget if budget is not None else -1.0)

    out = []
    for key in sorted(groups, key=rank):
        out.append(_table_row(key, groups[key], full, cells))
    smallest = _smallest_budgets(out, cells, tolerance)
    for row in out:
        row["min_budget"] = smallest.get(row["policy"])
        if row["policy"] == "full":
            row["min_budget"] = None
    measured = {p for p, _ in groups}
    missing = [p for p in (policies or []) if p not in measured]
    return QualityTable(cells, out, tolerance, missing)


def _table_row(
    key: tuple[str, float | None],
    jobs: Mapping[str, Mapping[str, Any]],
    full: Mapping[str, Mapping[str, Any]],
    cells: Sequence[Cell],
) -> dict[str, Any]:
    policy, budget = key
    keeps = [j["keep_ratio"] for j in jobs.values() if finite(j.get("keep_ratio"))]
    row: dict[str, Any] = {
        "policy": policy,
        "budget_ratio": budget,
        "keep_ratio": sum(keeps) / len(keeps) if keeps else None,
    }
    for cell in cells:
        job, base = jobs.get(cell.key), full.get(cell.key)
        value = job.get("value") if job else None
        row[cell.key] = value
        row[f"{cell.key}_vs_full"] = _share(
            value, base and base.get("value"), cell.higher_is_better
        )
        for length in cell.lengths:
            name = f"{cell.metric}@{length}"
            got = job.get(name) if job else None
            row[f"{cell.key}@{length}"] = got
            row[f"{cell.key}@{length}_vs_full"] = _share(
                got, base and base.get(name), cell.higher_is_better
            )
    own, ref = _seconds(jobs, full)
    row["time_vs_full"] = own / ref if own is not None and ref else None
    return row


def _seconds(
    jobs: Mapping[str, Mapping[str, Any]], full: Mapping[str, Mapping[str, Any]]
) -> tuple[float | None, float | None]:
    """Model seconds (tokens / tok_s) summed over the cells both have measured."""
    own = ref = 0.0
    for cell, job in jobs.items():
        base = full.get(cell)
        if base is None:
            continue
        a, b = _model_seconds(job), _model_seconds(base)
        if a is None or b is None:
            continue
        own, ref = own + a, ref + b
    return (own, ref) if ref > 0 else (None, None)


def _model_seconds(row: Mapping[str, Any]) -> float | None:
    tokens, rate = row.get("tokens"), row.get("tok_s")
    return tokens / rate if finite(tokens) and finite(rate) and rate > 0 else None


def _smallest_budgets(
    rows: Sequence[Mapping[str, Any]], cells: Sequence[Cell], tolerance: float, only: str = ""
) -> dict[str, float | None]:
    """Per policy: the smallest budget from which every task (or cell `only`) stays within.

    "Stays": that budget and every larger one measured are within `tolerance` of full on each
    task the full cache measured (a lucky small budget followed by a worse larger one does not
    count); None when even the largest misses.
    """
    full = next((r for r in rows if r["policy"] == "full"), None)
    if full is None:
        return {}
    chosen = [c for c in cells if (not only or c.key == only) and finite(full.get(c.key))]
    out: dict[str, float | None] = {}
    for policy in dict.fromkeys(r["policy"] for r in rows if r["policy"] != "full"):
        mine = sorted(
            (r for r in rows if r["policy"] == policy and r["budget_ratio"] is not None),
            key=lambda r: r["budget_ratio"],
        )
        smallest = None
        for r in reversed(mine):
            ok = all(
                finite(r.get(c.key))
                and within(r[c.key], full[c.key], c.higher_is_better, tolerance)
                for c in chosen
            )
            if not ok:
                break
            smallest = r["budget_ratio"]
        out[policy] = smallest
    return out


# ---- rendering ---------------------------------------------------------------------------------
def _length_label(length: str) -> str:
    n = int(length)
    return f"{n // 1024}k" if n % 1024 == 0 else length


def _cell_text(value: Any, share: Any, higher: bool) -> str:
    if not finite(value):
        return "-"
    if not finite(share):
        return num(value)
    return f"{num(value)} ({pct(share)})" if higher else f"{num(value)} ({pct(share, True)})"


def _budget_text(value: Any) -> str:
    return "none" if value is None else f"{value:.0%}"


def markdown(table: QualityTable, failures: Sequence[str] = ()) -> str:
    """The table in markdown, the per-task smallest budgets, and what was not measured."""
    head = ["policy", "budget", "keep"]
    for cell in table.cells:
        head += [f"{cell.label} {_length_label(n)}" for n in cell.lengths]
        head.append(f"{cell.label} all" if cell.lengths else cell.label)
    head += ["time vs full", f"smallest budget within {table.tolerance:.0%} of full"]
    better = "; ".join(sorted({_describe(c) for c in table.cells}))
    lines = [
        "### Quality against the full cache",
        "",
        "Each cell: the score and, in brackets, its share of the full cache's (ppl: its change "
        f"against full). {better}.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * (len(head) - 2),
    ]
    for row in table.rows:
        budget = "all" if row["policy"] == "full" else _budget_text(row["budget_ratio"])
        cells = [row["policy"], budget, pct(row.get("keep_ratio"))]
        for cell in table.cells:
            for n in cell.lengths:
                key = f"{cell.key}@{n}"
                cells.append(
                    _cell_text(row.get(key), row.get(f"{key}_vs_full"), cell.higher_is_better)
                )
            cells.append(
                _cell_text(row.get(cell.key), row.get(f"{cell.key}_vs_full"), cell.higher_is_better)
            )
        cells.append("-" if not finite(row.get("time_vs_full")) else f"{row['time_vs_full']:.2f}x")
        cells.append("" if row["policy"] == "full" else _budget_text(row.get("min_budget")))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", *_per_task_budgets(table)]
    if table.missing or failures:
        lines.append("Not measured:")
        lines.append("")
        lines += [
            f"- {p}: no row (no conf/cache/{p}.yaml, or every job failed)" for p in table.missing
        ]
        lines += [f"- {f}" for f in failures]
        lines.append("")
    return "\n".join(lines)


def _describe(cell: Cell) -> str:
    better = "higher" if cell.higher_is_better else "lower"
    return f"{cell.metric}: {better} is better"


def _per_task_budgets(table: QualityTable) -> list[str]:
    per = {
        c.key: _smallest_budgets(table.rows, table.cells, table.tolerance, only=c.key)
        for c in table.cells
    }
    policies = list(dict.fromkeys(r["policy"] for r in table.rows if r["policy"] != "full"))
    if not policies:
        return []
    lines = [
        f"Smallest budget within {table.tolerance:.0%} of full, per task (at that budget and "
        "every larger one measured):",
        "",
        "| policy | " + " | ".join(c.label for c in table.cells) + " | all tasks |",
        "|---|" + "---:|" * (len(table.cells) + 1),
    ]
    overall = _smallest_budgets(table.rows, table.cells, table.tolerance)
    for policy in policies:
        cells = [_budget_text(per[c.key].get(policy)) for c in table.cells]
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {_budget_text(overall[policy])} |")
    lines.append("")
    return lines


def write_csv(table: QualityTable, path: Path) -> Path:
    """The table as plain numbers, one row per policy and budget."""
    columns = list(dict.fromkeys(k for r in table.rows for k in r))
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in table.rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return path


def _failures(sweep_dir: Path) -> list[str]:
    """Failed or unfinished jobs of a sweep, one line each (from ``utils.sweep.summarize``)."""
    from llamahome.utils.sweep import summarize

    out = []
    for job in summarize(sweep_dir)["jobs"]:
        if job.get("status") != "completed":
            swept = " ".join(o for o in job.get("overrides") or [] if not o.startswith("sweep="))
            out.append(f"job #{job.get('num')} ({swept}) {job['status']}: {job.get('error')}")
    return out


def write_quality_report(
    sweep_dir: str | Path,
    rows: Sequence[Mapping[str, Any]] | None = None,
    policies: Sequence[str] | None = None,
    tolerance: float = 0.05,
) -> dict[str, Path]:
    """Write ``quality.md``, ``quality.csv`` and ``quality.png`` into a sweep directory.

    Args:
        sweep_dir: The ``sweep=quality`` multirun directory.
        rows: The rows (default: every job directory's ``results.jsonl``).
        policies: The preset's policy list (row order; policies with no row are listed).
        tolerance: "Within 5% of full".

    Returns:
        ``{"markdown", "csv", "plot"}`` paths; empty when there are no rows.
    """
    sweep_dir = Path(sweep_dir)
    rows = collect_rows(sweep_dir) if rows is None else [dict(r) for r in rows]
    if not rows:
        return {}
    from llamahome.evaluation.quality_plot import plot_quality

    table = build_table(rows, policies, tolerance)
    text = markdown(table, _failures(sweep_dir))
    markdown_path = sweep_dir / MARKDOWN
    markdown_path.write_text(text, encoding="utf-8")
    return {
        "markdown": markdown_path,
        "csv": write_csv(table, sweep_dir / CSV),
        "plot": plot_quality(table, rows, sweep_dir / PLOT),  # quality_plot.py
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m llamahome.evaluation.quality_table <sweep dir>``: rebuild the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a python -m llamahome.eval sweep=quality dir")
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    paths = write_quality_report(args.sweep_dir, tolerance=args.tolerance)
    if not paths:
        raise SystemExit(f"error: no results.jsonl under {args.sweep_dir}")
    print(paths["markdown"].read_text(encoding="utf-8"))
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
