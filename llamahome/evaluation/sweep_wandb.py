"""A sweep's W&B run: the rows as a table, a line plot per task (metric vs budget), the PNG."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llamahome.evaluation.results import POLICY_ORDER, labelled, sort_rows
from llamahome.evaluation.sweep_tables import budget_of, full_values

log = logging.getLogger("llamahome.eval")


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
        "keep_ratio",
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


def log_sweep_run(config: DictConfig, rows: list, png: Path, sweep_dir: Path) -> None:
    """One W&B run for a whole sweep (``job_type=eval-sweep``, in the jobs' group)."""
    import wandb

    def setting(key: str, default: Any = None) -> Any:
        # Key by key: save_dir interpolates the job's output dir, unset after the sweep.
        value = OmegaConf.select(config, f"logger.wandb.{key}", default=default)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

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


def _wandb_cell(value: Any) -> Any:
    return value if value is None or isinstance(value, int | float | str | bool) else str(value)
