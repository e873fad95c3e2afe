"""Result rows: one per (task, policy, budget), written as ``results.jsonl`` and ``results.csv``.

A row is a flat dict, so a sweep's rows from many job directories concatenate into one table
(``collect_rows``) that pandas, a spreadsheet or the W&B table reads as is. The columns every
row has are :data:`COLUMNS`; task-specific metrics (``rouge2``, ``accuracy@512``, ...) follow.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

JSONL = "results.jsonl"
CSV = "results.csv"
# Policies in the order tables and plots list them: the baseline first.
POLICY_ORDER = ("full", "h2o", "sink", "window")
COLUMNS = (
    "task",
    "metric",
    "value",
    "higher_is_better",
    "policy",
    "budget_ratio",
    "budget",
    "kv_bytes",
    "full_kv_bytes",
    "kv_ratio",
    "keep_ratio",
    "note",
    "tokens",
    "tok_s",
    "wall_s",
    "load_s",
    "model",
    "config_hash",
    "overrides",
)
# The config keys that decide a row's numbers; run names, paths and loggers do not.
_HASHED_KEYS = ("model", "model_path", "cache", "task", "seed")


def config_hash(cfg: DictConfig) -> str:
    """Hash what decides the numbers (model, cache, task, seed): short and stable.

    The full cache ignores ``cache.budget_ratio`` and evicts no question token, so its budget and
    ``task.question_protected`` are left out of the hash: the full-cache jobs of a budget or
    protocol sweep share one hash (and the sweep computes them once).

    Args:
        cfg: The composed eval config.

    Returns:
        12 hex digits.
    """
    chosen = {k: OmegaConf.select(cfg, k) for k in _HASHED_KEYS}
    plain = {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
        for k, v in chosen.items()
    }
    cache = dict(plain.get("cache") or {})
    if cache.get("policy") == "full":
        cache.pop("budget_ratio", None)
        # Nothing is evicted, so both question protocols compute the same answers.
        if isinstance(plain.get("task"), dict):
            plain["task"] = {k: v for k, v in plain["task"].items() if k != "question_protected"}
    plain["cache"] = cache
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_rows(rows: Iterable[Mapping[str, Any]], directory: str | Path) -> tuple[Path, Path]:
    """Write rows to ``<directory>/results.jsonl`` and ``results.csv`` (replacing them).

    Args:
        rows: Result rows.
        directory: Where to write.

    Returns:
        The two paths (jsonl, csv).
    """
    rows = [dict(r) for r in rows]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jsonl, table = directory / JSONL, directory / CSV
    with jsonl.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, default=_json_default) + "\n")
    columns = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))
    with table.open("w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return jsonl, table


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``results.jsonl`` file (blank lines skipped)."""
    rows = []
    with Path(path).open(encoding="utf-8") as file:
        for line in file:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def collect_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of a sweep: every job directory's ``results.jsonl``, in job order.

    The sweep's own aggregate (``<sweep dir>/results.jsonl``) is not read back.

    Args:
        sweep_dir: A Hydra multirun directory (or any directory holding job directories).

    Returns:
        The rows, each with ``job`` (the job directory's name) added.
    """
    sweep_dir = Path(sweep_dir)
    found = [p for p in sweep_dir.rglob(JSONL) if p.parent != sweep_dir]
    rows: list[dict[str, Any]] = []
    for path in sorted(found, key=lambda p: _job_sort_key(p.parent.relative_to(sweep_dir))):
        for row in read_rows(path):
            row.setdefault("job", str(path.parent.relative_to(sweep_dir)))
            rows.append(row)
    return rows


def sort_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows ordered by task, budget (ascending, no budget last) and policy (full first)."""

    def key(row: Mapping[str, Any]) -> tuple:
        ratio = row.get("budget_ratio")
        policy = row.get("policy")
        rank = POLICY_ORDER.index(policy) if policy in POLICY_ORDER else len(POLICY_ORDER)
        return (str(row.get("task")), ratio is None, ratio or 0.0, rank, str(row.get("budget")))

    return sorted((dict(r) for r in rows), key=key)


def _job_sort_key(rel: Path) -> tuple:
    parts = rel.parts
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _csv_value(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, default=_json_default)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return "" if value is None else value


# ---- protocols and the smallest budget within a tolerance of full -----------------------------

PROTOCOL_LABELS = {
    "question_protected": "question protected",
    "question_compressed": "question compressed",
}


def task_label(row: Mapping[str, Any]) -> str:
    """Return a row's task as tables show it, e.g. ``passkey [question protected]``."""
    task = str(row.get("task"))
    protocol = PROTOCOL_LABELS.get(str(row.get("protocol")))
    return f"{task} [{protocol}]" if protocol and not task.endswith("]") else task


def labelled(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy `rows` with a ``task`` that names the protocol too, so the two are tabled apart."""
    return [{**row, "task": task_label(row)} for row in rows]


def within(value: float, full: float, higher_is_better: bool, tolerance: float = 0.05) -> bool:
    """Whether `value` is no more than `tolerance` (relative) worse than `full`.

    Better than full always counts; with ``full == 0`` only ``value`` at least as good does.
    """
    slack = tolerance * abs(full)
    return value >= full - slack if higher_is_better else value <= full + slack


def min_budgets(rows: Iterable[Mapping[str, Any]], tolerance: float = 0.05) -> list[dict[str, Any]]:
    """Per task, model and policy: the smallest budget from which it stays within 5% of full.

    "Stays": the budget's value and the value at every larger budget measured are within
    `tolerance` of the full cache's (the mean of the full rows of that task and model), so a
    lucky small budget followed by a worse larger one does not count. Rows are grouped by
    :func:`task_label` (each protocol apart); rows without ``budget_ratio`` (count budgets) are
    left out.

    Args:
        rows: Result rows (a sweep's).
        tolerance: Relative tolerance (0.05 = 5% of the full cache's value).

    Returns:
        One dict per (task, model, policy) with ``min_budget`` (None when even the largest budget
        is further than `tolerance` from full), ``value`` there, ``full``, and ``budgets`` (the
        budgets measured).
    """
    rows = [dict(r) for r in rows]
    full: dict[tuple[str, str], list[float]] = {}
    points: dict[tuple[str, str, str], dict[float, float]] = {}
    higher: dict[str, bool] = {}
    for row in rows:
        value = row.get("value")
        if not isinstance(value, int | float) or not math.isfinite(value):
            continue
        task, model = task_label(row), str(row.get("model"))
        higher[task] = bool(row.get("higher_is_better"))
        if row.get("policy") == "full":
            full.setdefault((task, model), []).append(float(value))
        elif row.get("budget_ratio") is not None:
            cell = points.setdefault((task, model, str(row.get("policy"))), {})
            cell[float(row["budget_ratio"])] = float(value)
    out = []
    for (task, model, policy), values in points.items():
        if (task, model) not in full:
            continue
        base = sum(full[(task, model)]) / len(full[(task, model)])
        budgets = sorted(values)
        smallest = None
        for budget in reversed(budgets):
            if not within(values[budget], base, higher[task], tolerance):
                break
            smallest = budget
        out.append(
            {
                "task": task,
                "model": model,
                "policy": policy,
                "min_budget": smallest,
                "value": values[smallest] if smallest is not None else None,
                "full": base,
                "budgets": budgets,
            }
        )
    rank = {p: i for i, p in enumerate(POLICY_ORDER)}
    return sorted(
        out, key=lambda r: (r["task"], r["model"], rank.get(r["policy"], 99), r["policy"])
    )


def min_budget_table(rows: Sequence[Mapping[str, Any]], tolerance: float = 0.05) -> list[str]:
    """Markdown lines: per task and policy, the smallest budget that stays within 5% of full."""
    found = min_budgets(rows, tolerance)
    if not found:
        return []
    lines = [
        f"Smallest KV budget that stays within {tolerance:.0%} of the full cache "
        "(at that budget and every larger one measured):",
        "",
        "| task | model | policy | smallest budget | value there | full cache | budgets measured |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in found:
        budget = f"{r['min_budget']:.0%}" if r["min_budget"] is not None else "none"
        measured = ", ".join(f"{b:.0%}" for b in r["budgets"])
        lines.append(
            f"| {r['task']} | {r['model']} | {r['policy']} | {budget} | {_num(r['value'])} "
            f"| {_num(r['full'])} | {measured} |"
        )
    lines.append("")
    return lines


def _num(value: Any) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{float(value):.4g}"
