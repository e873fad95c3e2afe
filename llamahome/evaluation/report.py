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
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from llamahome.evaluation.results import (
    POLICY_ORDER,
    collect_rows,
    labelled,
    min_budget_table,
    min_budgets,
    sort_rows,
    write_rows,
)

log = logging.getLogger("llamahome.eval")

MARKDOWN = "results.md"
PLOT = "results.png"
_MIB = 2**20


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
        if row.get("policy") == "full" and _finite(row.get("value")):
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
            and _finite(row.get("value"))
        ):
            cells.setdefault((row["task"], float(budget)), {})[row["policy"]] = float(row["value"])
    out = []
    for (task, budget), values in sorted(cells.items()):
        if task not in full or "h2o" not in values:
            continue
        base = full[task]
        entry: dict[str, Any] = {"task": task, "budget_ratio": budget, "full": base}
        entry.update(values)
        entry["h2o_vs_full"] = _relative(values["h2o"], base)
        # Loss against full, positive = worse, whichever direction the metric improves in.
        sign = -1.0 if higher[task] else 1.0
        window_loss = sign * (values["window"] - base) if "window" in values else 0.0
        if window_loss > 0:  # otherwise window lost nothing, and there is no gap to close
            h2o_loss = max(0.0, sign * (values["h2o"] - base))
            entry["h2o_closer_than_window"] = 1 - h2o_loss / window_loss
        if "sink" in values:
            entry["sink_vs_full"] = _relative(values["sink"], base)
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
            head + "KV held MiB | KV vs full | tok/s | wall s | note |",
            "|---|---|---:|---:|" + "---:|" * len(extras) + "---:|---:|---:|---:|---|",
        ]
        for r in task_rows:
            change = _relative(r.get("value"), full.get(task)) if task in full else None
            cells = [
                r.get("policy"),
                r.get("budget"),
                _num(r.get("value")),
                _pct(change, signed=True),
                *(_num(r.get(k)) for k in extras),
                _num((r.get("kv_bytes") or 0) / _MIB),
                _pct(r.get("kv_ratio")),
                _num(r.get("tok_s")),
                _num(r.get("wall_s")),
                r.get("note") or "",
            ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    comparisons = gap_closed(rows)
    if comparisons:
        lines.append("H2O against the full cache and the window at the same budget:")
        lines.append("")
        for c in comparisons:
            h2o = _pct(c["h2o_vs_full"], signed=True)
            text = f"- {c['task']} @ {c['budget_ratio']:.0%}: h2o {h2o} vs full"
            if "h2o_closer_than_window" in c:
                text += f", {_pct(c['h2o_closer_than_window'])} closer to full than window"
            if "sink_vs_full" in c:
                text += f"; sink {_pct(c['sink_vs_full'], signed=True)} vs full"
                text += " (sink beats h2o here)" if c["sink_beats_h2o"] else ""
            lines.append(text)
        lines.append("")
    lines += min_budget_table(rows)
    return "\n".join(lines)


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
                if r["policy"] == policy and budget_of(r) is not None and _finite(r.get("value"))
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

    for row in distinct(rows):
        name = file_name(row)
        if (drawn := draw(row, sweep_dir / name)) is not None:
            paths[name] = drawn
    return paths


def log_wandb_rows(run: Any, rows: Sequence[Mapping[str, Any]], png: Path | None = None) -> None:
    """Log rows to a W&B run: a table, a line plot per task (metric vs budget), the PNG."""
    import wandb

    rows = sort_rows(labelled(rows))
    columns = [
        "task",
        "metric",
        "value",
        "policy",
        "budget",
        "budget_ratio",
        "kv_bytes",
        "kv_ratio",
        "tok_s",
        "wall_s",
        "note",
        "model",
        "config_hash",
    ]
    data = [[_wandb_cell(r.get(c)) for c in columns] for r in rows]
    payload: dict[str, Any] = {"eval/results": wandb.Table(columns=columns, data=data)}
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task and budget_of(r) is not None]
        metric = next(r["metric"] for r in rows if r["task"] == task)
        full = full_values(rows).get(task)
        policies = [p for p in POLICY_ORDER if p != "full"]
        series = {
            p: sorted((budget_of(r), r["value"]) for r in task_rows if r["policy"] == p)
            for p in policies
        }
        series = {p: pts for p, pts in series.items() if pts}
        if full is not None:
            xs = sorted({x for pts in series.values() for x, _ in pts}) or [0.0, 1.0]
            series["full"] = [(x, full) for x in xs]
        if series:
            payload[f"eval/{task}_vs_budget"] = wandb.plot.line_series(
                xs=[[x for x, _ in pts] for pts in series.values()],
                ys=[[y for _, y in pts] for pts in series.values()],
                keys=list(series),
                title=f"{task}: {metric} vs KV budget",
                xname="KV budget (share of tokens kept)",
            )
    if png is not None and Path(png).is_file():
        payload["eval/plot"] = wandb.Image(str(png))
    run.log(payload)


def wandb_offline(settings: Mapping[str, Any] | None = None) -> bool:
    """Offline unless an API key is configured (or ``offline``/``WANDB_MODE`` say otherwise)."""
    forced = (settings or {}).get("offline")
    if forced is not None:
        return bool(forced)
    if os.environ.get("WANDB_MODE") in {"offline", "dryrun"}:
        return True
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    return not has_key


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
            self._log_wandb(config, rows, paths["plot"], sweep_dir)

    @staticmethod
    def _log_wandb(config: DictConfig, rows: list, png: Path, sweep_dir: Path) -> None:
        import wandb

        def setting(key: str, default: Any = None) -> Any:
            # Key by key: save_dir interpolates the job's output dir, unset after the sweep.
            value = OmegaConf.select(config, f"logger.wandb.{key}", default=default)
            return (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )

        name = OmegaConf.select(config, "run_name", default=None) or "eval"
        group = setting("group") or f"{name}-{sweep_dir.name}"  # the jobs' group (loggers.py)
        run = wandb.init(
            project=setting("project") or "llamahome",
            group=group,
            name=f"{name}-sweep",
            job_type="eval-sweep",
            tags=[str(t) for t in setting("tags") or []],
            dir=str(sweep_dir),
            mode="offline" if wandb_offline({"offline": setting("offline")}) else "online",
            reinit="finish_previous",
        )
        try:
            log_wandb_rows(run, rows, png)
        finally:
            run.finish()
        log.info("Eval sweep logged to W&B run %s (group %s)", run.id, group)


def _summary(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "task": row.get("task"),
        "policy": row.get("policy"),
        "budget": row.get("budget"),
        row.get("metric", "value"): row.get("value"),
        "KV MiB": (row.get("kv_bytes") or 0) / _MIB,
        "KV share": row.get("kv_ratio"),
        "tok/s": row.get("tok_s"),
        "note": row.get("note") or "",
    }


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


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _relative(value: Any, base: Any) -> float | None:
    if not (_finite(value) and _finite(base)) or base == 0:
        return None
    return (float(value) - float(base)) / abs(float(base))


def _num(value: Any) -> str:
    if not _finite(value):
        return "-"
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def _pct(value: Any, signed: bool = False) -> str:
    if not _finite(value):
        return "-"
    return f"{value:+.1%}" if signed else f"{value:.0%}"


def _wandb_cell(value: Any) -> Any:
    return value if value is None or isinstance(value, int | float | str | bool) else str(value)


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
