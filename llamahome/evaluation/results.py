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
from collections.abc import Iterable, Mapping
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

    The full cache ignores ``cache.budget_ratio``, so its budget is left out of the hash: the
    full-cache jobs of a budget sweep share one hash (and the sweep computes them once).

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
