"""What one eval job does around its task: label the budget, reuse a twin's row, print the row.

``llamahome.eval`` composes the config and loads the model; the helpers here turn a task's
outcome into the result row that ``results.py`` writes and ``report.py`` aggregates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llamahome.utils.sweep import in_multirun

log = logging.getLogger("llamahome.eval")

__all__ = ["describe_budget", "identical_row", "job_overrides", "print_row"]


def describe_budget(cache_spec: Any) -> tuple[str, float | None]:
    """Return a budget's label for tables (``20%``, ``256 tokens``) and its total ratio."""
    if cache_spec.policy == "full":
        return "all", cache_spec.budget_ratio
    budget = cache_spec.budget
    if budget.is_ratio:
        ratio = (budget.heavy_ratio or 0.0) + budget.recent_ratio
        ratio = cache_spec.budget_ratio or ratio
        label = f"{ratio:.0%}"
        if budget.sink:
            label += f" ({budget.sink} sinks)"
        return label, ratio
    total = budget.sink + budget.heavy + budget.recent
    return f"{total} tokens", None


def identical_row(cfg: DictConfig, digest: str, task_name: str) -> dict[str, Any] | None:
    """In a sweep, a row another job already computed with the same effective config.

    The full cache ignores ``cache.budget_ratio`` and evicts no question token, so ``cache=full``
    in a budget (or protocol) sweep would run the same evaluation once per budget (protocol);
    the later jobs copy the first one's row instead. A sweep rerun in its own directory
    (``hydra.sweep.dir=<old sweep dir>``) resumes: a job whose directory already holds its row
    keeps it, so only the jobs that never finished run.
    """
    from hydra.core.hydra_config import HydraConfig

    from llamahome.evaluation.protocol import protocol_name
    from llamahome.evaluation.results import JSONL, read_rows

    if not in_multirun():
        return None
    sweep_dir = Path(HydraConfig.get().sweep.dir)
    own = Path(cfg.paths.output_dir).resolve()
    mine = own / JSONL
    others = sorted(p for p in sweep_dir.resolve().glob(f"*/{JSONL}") if p != mine)
    for path in [mine, *others]:
        if not path.is_file():
            continue
        for row in read_rows(path):
            if row.get("config_hash") != digest or row.get("task") != task_name:
                continue
            if path == mine:
                log.info("Resuming the sweep: this job's row is already in %s (no re-run)", path)
                return dict(row)
            log.info("Same effective config as %s: reusing its row (no re-run)", path.parent.name)
            copy = dict(row)
            copy["budget_ratio"] = OmegaConf.select(cfg, "cache.budget_ratio")
            protected = OmegaConf.select(cfg, "task.question_protected")
            if protected is not None:  # the full cache answers the same under both
                copy["protocol"] = protocol_name(bool(protected))
            copy["overrides"] = job_overrides()
            copy["reused_from"] = path.parent.name
            return copy
    return None


def job_overrides() -> str:
    """Return this job's own command-line overrides (Hydra's internals left out), joined."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return " ".join(o for o in HydraConfig.get().overrides.task if not o.startswith("hydra"))


def print_row(row: dict[str, Any], output_dir: Path) -> None:
    """Print the row as one line: metric, policy and budget, KV held vs full, speed, where."""
    kv = f"KV {row['kv_bytes'] / 2**20:.2f} MiB held vs {row['full_kv_bytes'] / 2**20:.2f} MiB full"
    if row.get("kv_ratio") is not None:
        kv += f" ({row['kv_ratio']:.0%})"
    if row.get("keep_ratio") is not None:
        kv += f", keep {row['keep_ratio']:.0%}"
    speed = f"{row['tok_s']:.1f} tok/s" if row.get("tok_s") else "- tok/s"
    note = f" | {row['note']}" if row.get("note") else ""
    print(
        f"[eval] {row['task']} {row['metric']}={row['value']:.4g} | cache={row['policy']} "
        f"{row['budget']} | {kv} | {speed}, {row['wall_s']:.1f} s{note} | {row['model']} "
        f"| {output_dir / 'results.csv'}",
        flush=True,
    )
