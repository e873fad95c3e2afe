"""A sweep's aggregate: one table (jsonl, csv, markdown), one plot (PNG), W&B tables and plots.

``SweepReport`` is a Hydra callback (``conf/eval.yaml`` adds it to ``hydra.callbacks``): when a
``python -m llamahome.eval -m ...`` multirun ends it reads every job's ``results.jsonl`` and
writes, into the sweep directory:

* ``results.jsonl`` / ``results.csv``: all rows, sorted by task, budget and policy;
* ``results.md``: a markdown table per task (metric, change against the full cache, KV bytes
  held, tok/s) and, where h2o and window ran at the same budget, how much of window's gap to
  the full cache h2o closes;
* ``results.png``: quality against KV budget, one line per policy, the full cache as a
  horizontal line (one panel per task);
* per task and policy, the smallest budget that stays within 5% of the full cache (a table in
  ``results.md``, printed too);
* ``heatmap_<task>_<protocol>_<policy>_<budget>.png`` for rows with a depth x length grid
  (``task=niah``, ``task=passkey``).

Question tasks are tabled once per protocol (``passkey [question protected]``,
``passkey [question compressed]``).
* with ``logger=wandb``, one W&B run (``job_type=eval-sweep``, in the jobs' group) with the
  table, a line plot per task and the PNG.

``python -m llamahome.evaluation.report <sweep dir>`` rebuilds all of it from the job rows.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from llamahome.evaluation.results import collect_rows, min_budgets, sort_rows, write_rows
from llamahome.evaluation.sweep_plot import plot
from llamahome.evaluation.sweep_tables import (
    MIB,
    budget_of,
    distinct,
    full_values,
    gap_closed,
    markdown_table,
)
from llamahome.evaluation.sweep_wandb import log_sweep_run, log_wandb_rows, wandb_offline

# The helpers live in sweep_tables / sweep_plot / sweep_wandb; these names stay importable here.
__all__ = [
    "MARKDOWN",
    "PLOT",
    "SweepReport",
    "budget_of",
    "distinct",
    "full_values",
    "gap_closed",
    "log_wandb_rows",
    "markdown_table",
    "plot",
    "wandb_offline",
    "write_report",
]

log = logging.getLogger("llamahome.eval")

MARKDOWN = "results.md"
PLOT = "results.png"


def write_report(
    sweep_dir: str | Path, rows: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Path]:
    """Write the aggregate files of a sweep directory.

    Args:
        sweep_dir: The multirun directory.
        rows: The rows (default: collected from the job directories).

    Returns:
        ``{"jsonl", "csv", "markdown", "plot"}`` paths; empty when there are no rows.
    """
    sweep_dir = Path(sweep_dir)
    rows = sort_rows(collect_rows(sweep_dir) if rows is None else rows)
    if not rows:
        return {}
    jsonl, table = write_rows(rows, sweep_dir)
    markdown = sweep_dir / MARKDOWN
    markdown.write_text(markdown_table(rows), encoding="utf-8")
    png = plot(rows, sweep_dir / PLOT)
    paths = {"jsonl": jsonl, "csv": table, "markdown": markdown, "plot": png}
    from llamahome.evaluation.heatmap import draw, file_name

    for row in rows:  # one per task, protocol, policy and budget (reused rows are repeats)
        name = file_name(row)
        if name in paths:
            continue
        if (drawn := draw(row, sweep_dir / name)) is not None:
            paths[name] = drawn
    return paths


class SweepReport(Callback):
    """Hydra callback: after an eval multirun, write the aggregate (and log it to W&B)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Aggregate the jobs' rows into the sweep directory."""
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        paths = write_report(sweep_dir)
        if not paths:
            log.warning(
                "Eval sweep %s: no job wrote results.jsonl (see sweep_summary.json).", sweep_dir
            )
            return
        from llamahome.evaluation.results import read_rows
        from llamahome.utils.rich_utils import print_table

        rows = read_rows(paths["jsonl"])
        print_table(f"Eval sweep ({len(rows)} rows)", [_summary(r) for r in rows])
        for line in markdown_table(rows).splitlines():
            if line.startswith("- "):  # the h2o vs full / window lines
                print(line[2:], flush=True)
        smallest = min_budgets(rows)
        if smallest:
            print_table(
                "Smallest budget within 5% of full",
                [
                    {
                        "task": r["task"],
                        "policy": r["policy"],
                        "smallest budget": "none"
                        if r["min_budget"] is None
                        else f"{r['min_budget']:.0%}",
                        "value": r["value"],
                        "full": r["full"],
                    }
                    for r in smallest
                ],
            )
        log.info("Eval sweep aggregate: %s, %s, %s", paths["csv"], paths["markdown"], paths["plot"])
        if OmegaConf.select(config, "logger.wandb") is not None:
            log_sweep_run(config, rows, paths["plot"], sweep_dir)


def _summary(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "task": row.get("task"),
        "policy": row.get("policy"),
        "budget": row.get("budget"),
        row.get("metric", "value"): row.get("value"),
        "KV MiB": (row.get("kv_bytes") or 0) / MIB,
        "KV share": row.get("kv_ratio"),
        "tok/s": row.get("tok_s"),
        "note": row.get("note") or "",
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m llamahome.evaluation.report <sweep dir>``: rebuild a sweep's aggregate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a python -m llamahome.eval -m ... directory")
    args = parser.parse_args(argv)
    paths = write_report(args.sweep_dir)
    if not paths:
        raise SystemExit(f"error: no results.jsonl under {args.sweep_dir}")
    print(paths["markdown"].read_text(encoding="utf-8"))
    for kind, path in paths.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
