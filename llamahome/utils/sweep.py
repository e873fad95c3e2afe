"""Hydra multiruns that survive a failing job, and a summary of what each job did.

Hydra runs a sweep's jobs through a launcher (in-process, submitit local or SLURM) and a
sweeper (grid, Optuna). A job that raises is recorded as failed, but the basic sweeper then
re-raises it after its batch and the Optuna sweeper stops unless told otherwise; a
``LlamaHomeError`` turned into ``SystemExit`` escapes Hydra altogether. So in a multirun the
entry point runs each job through :func:`run_sweep_job`, which logs the error in one line
(the traceback goes to the job's ``error.log``), records ``job_status.json`` in the job dir and
returns ``None``, the value sweepers treat as "no result" (Optuna marks the trial failed and
moves on). :class:`SweepSummary`, a Hydra callback (``conf/hydra/default.yaml``), reads those
files when the sweep ends and writes ``sweep_summary.json`` naming every job that failed; the
command then exits with status 1 (:func:`failed_jobs_line`, read by ``utils/cli.py:launch``).
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from llamahome.utils.cli import is_rank_zero
from llamahome.utils.paths import atomic_write
from llamahome.utils.tracking import finish_run

log = logging.getLogger("llamahome.sweep")

STATUS_FILE = "job_status.json"
ERROR_FILE = "error.log"
SUMMARY_FILE = "sweep_summary.json"
# The summaries of the multiruns this process ran: the entry point's exit status reads them.
_SUMMARIES: list[dict[str, Any]] = []


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_sweep_job(
    task: Callable[[DictConfig], Mapping[str, float]], cfg: DictConfig, metric: str | None
) -> float | None:
    """Run one multirun job so that its failure stays the job's, not the sweep's.

    Args:
        task: The job (``llamahome.train.train``): config in, metrics out.
        cfg: The job's composed config.
        metric: The metric to return to the sweeper (``cfg.optimized_metric``).

    Returns:
        The metric's value, or ``None`` when the job failed, the metric is missing or it is not
        finite (a NaN would otherwise win Optuna's comparisons).
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    record: dict[str, Any] = {
        "num": int(hydra_cfg.job.num),
        "overrides": list(hydra_cfg.overrides.task),
        "dir": str(job_dir),
        "metric": metric,
    }
    start = time.perf_counter()
    try:
        metrics = dict(task(cfg))
    except Exception as err:  # noqa: BLE001 - isolating any job failure is this function's job
        finish_run(failed=True)  # the next job in this process must not log into it
        error = one_line(err)
        if is_rank_zero():
            (job_dir / ERROR_FILE).write_text(traceback.format_exc())
        log.error(
            "Job #%d failed: %s (traceback: %s). The sweep goes on.",
            record["num"],
            error,
            job_dir / ERROR_FILE,
        )
        _write_status(job_dir, {**record, "status": "failed", "error": error}, start)
        return None
    value = metrics.get(metric) if metric else None
    if metric and (value is None or not math.isfinite(float(value))):
        error = f"optimized_metric {metric!r} is {value!r}"
        log.error("Job #%d failed: %s.", record["num"], error)
        _write_status(job_dir, {**record, "status": "failed", "error": error}, start)
        return None
    finite = {
        k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)
    }
    result = None if value is None else float(value)
    _write_status(
        job_dir, {**record, "status": "completed", "value": result, "metrics": finite}, start
    )
    return result


def one_line(err: BaseException) -> str:
    """``Type: message`` in one line; for errors wrapping a child's traceback, its last line."""
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "Traceback (most recent call last)" in text:  # e.g. torch.multiprocessing's errors
        return lines[-1]
    return f"{type(err).__name__}: {lines[0]}"


class SweepSummary(Callback):
    """Hydra callback: after a multirun, list every job's status and the best result.

    Writes ``<sweep dir>/sweep_summary.json`` and logs one line per job. Jobs are found by their
    ``job_status.json`` (written by :func:`run_sweep_job`, or by :meth:`on_job_end` from Hydra's
    own job result when a task function without it failed); a job dir with Hydra's
    ``.hydra/overrides.yaml`` but no status is reported as ``unknown`` (killed, out of memory).
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Record a failure Hydra caught itself (the task did not use run_sweep_job)."""
        from hydra.core.utils import JobStatus

        if job_return is None or job_return.status != JobStatus.FAILED:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if (job_dir / STATUS_FILE).exists():
            return
        err = getattr(job_return, "_return_value", None)  # .return_value would re-raise it
        record = {
            "num": int(config.hydra.job.num),
            "overrides": list(job_return.overrides or []),
            "dir": str(job_dir),
            "status": "failed",
            "error": one_line(err) if isinstance(err, BaseException) else repr(err),
        }
        _write_status(job_dir, record, None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarise the sweep into ``sweep_summary.json`` and the log."""
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        direction = OmegaConf.select(config, "hydra.sweeper.direction", default="minimize")
        summary = summarize(sweep_dir, minimize=str(direction).lower().startswith("min"))
        (sweep_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        _log_summary(summary, sweep_dir)
        _SUMMARIES.append(summary)


def failed_jobs_line() -> str | None:
    """One line naming the failed (or killed) jobs of this process's multiruns, else ``None``.

    The entry points print it and exit with status 1 (``utils/cli.py:launch``): a sweep in which
    a job failed must not look like a success to a script or a CI step.
    """
    for summary in _SUMMARIES:
        bad = sorted(summary["failed"] + summary["unknown"], key=lambda n: (n is None, n or 0))
        if bad:
            nums = ", ".join(f"#{n}" for n in bad)
            path = Path(summary["sweep_dir"]) / SUMMARY_FILE
            return f"{len(bad)} of {len(summary['jobs'])} sweep jobs failed ({nums}); see {path}"
    return None


def summarize(sweep_dir: Path, minimize: bool = True) -> dict[str, Any]:
    """Collect the job statuses under ``sweep_dir``.

    Args:
        sweep_dir: The multirun's ``hydra.sweep.dir``.
        minimize: Whether a lower optimized metric is better (Optuna's ``direction``).

    Returns:
        ``jobs`` (sorted by job number), ``completed``/``failed``/``unknown`` (job numbers) and
        ``best`` (the best completed job, or ``None``).
    """
    jobs: dict[str, dict[str, Any]] = {}
    for path in sweep_dir.rglob(STATUS_FILE):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {"num": None, "status": "unknown", "error": f"unreadable {path.name}"}
        record.setdefault("dir", str(path.parent))
        jobs[str(path.parent)] = record
    for overrides in sweep_dir.rglob(".hydra/overrides.yaml"):
        job_dir = overrides.parent.parent
        if str(job_dir) not in jobs and job_dir != sweep_dir:
            jobs[str(job_dir)] = {
                "num": _job_num(job_dir),
                "overrides": list(OmegaConf.load(overrides)),
                "dir": str(job_dir),
                "status": "unknown",
                "error": "no job_status.json: the job was killed or is still running",
            }
    ordered = sorted(jobs.values(), key=lambda r: (r.get("num") is None, r.get("num") or 0))
    by_status = {
        s: [r.get("num") for r in ordered if r["status"] == s]
        for s in ("completed", "failed", "unknown")
    }
    scored = [r for r in ordered if r["status"] == "completed" and r.get("value") is not None]
    best = None
    if scored:
        best = (min if minimize else max)(scored, key=lambda r: r["value"])
    return {"sweep_dir": str(sweep_dir), "jobs": ordered, **by_status, "best": best}


def _log_summary(summary: dict[str, Any], sweep_dir: Path) -> None:
    jobs = summary["jobs"]
    log.info(
        "Sweep summary: %d jobs, %d completed, %d failed%s (%s)",
        len(jobs),
        len(summary["completed"]),
        len(summary["failed"]),
        f", {len(summary['unknown'])} unknown" if summary["unknown"] else "",
        sweep_dir / SUMMARY_FILE,
    )
    # Only what tells the jobs apart (the swept values), not the overrides they all share.
    shared = (
        set.intersection(*(set(j.get("overrides") or []) for j in jobs)) if len(jobs) > 1 else set()
    )

    def swept(job: dict[str, Any]) -> str:
        return " ".join(o for o in job.get("overrides") or [] if o not in shared)

    for job in jobs:
        if job["status"] == "completed":
            metric = job.get("metric")
            value = f"{metric}={_fmt(job.get('value'))}" if metric else ""
            log.info("  #%s completed %s  %s", job.get("num"), value, swept(job))
        else:
            log.error(
                "  #%s %s: %s  %s",
                job.get("num"),
                job["status"].upper(),
                job.get("error"),
                swept(job),
            )
    best = summary["best"]
    if best is not None:
        log.info(
            "  best: #%s %s=%s  %s",
            best["num"],
            best.get("metric"),
            _fmt(best["value"]),
            swept(best),
        )


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _job_num(job_dir: Path) -> int | None:
    try:
        return int(OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.job.num)
    except Exception:  # noqa: BLE001 - a best-effort label for a job that left no status
        return None


def _write_status(job_dir: Path, record: dict[str, Any], start: float | None) -> None:
    if not is_rank_zero():
        return
    if start is not None:
        record["seconds"] = round(time.perf_counter() - start, 2)
    with atomic_write(job_dir / STATUS_FILE, "w") as file:
        file.write(json.dumps(record, indent=2))


class SweepProgress(Callback):
    """Hydra callback: a line before each job of a multirun, ``[sweep] job 7/72 ...``.

    The total comes from the sweeper's grid (its ``params`` and the command line's sweeps, as
    Hydra's basic sweeper expands them); the line gives the job's own overrides, the time since
    the sweep started and a rough time left (finished jobs' mean; reused rows make it shrink).
    Long sweeps (``sweep=quality``) print it; the task's own progress bars follow.
    """

    def __init__(self) -> None:
        """Nothing counted yet."""
        self.total: int | None = None
        self.start = time.perf_counter()
        self.done = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Count the jobs and say where they go (and how to resume)."""
        self.start = time.perf_counter()
        self.total = grid_size(config)
        if self.total:
            log.info(
                "[sweep] %d jobs into %s (rerun with hydra.sweep.dir=%s to resume: finished "
                "rows are reused)",
                self.total,
                config.hydra.sweep.dir,
                config.hydra.sweep.dir,
            )

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """One line: job number of the total, its overrides, elapsed and left."""
        num = int(OmegaConf.select(config, "hydra.job.num", default=0) or 0) + 1
        elapsed = time.perf_counter() - self.start
        of = f"/{self.total}" if self.total else ""
        left = ""
        if self.done and self.total:
            left = f", ~{_clock(elapsed / self.done * (self.total - self.done))} left"
        overrides = " ".join(
            o for o in OmegaConf.select(config, "hydra.overrides.task", default=[]) or []
        )
        print(f"[sweep] job {num}{of}: {overrides} ({_clock(elapsed)} in{left})", flush=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Count the job as done."""
        self.done += 1


def grid_size(config: DictConfig) -> int | None:
    """Jobs in a basic-sweeper grid: the sweeper's ``params`` and the command line's overrides.

    Returns None when the grid cannot be read (another sweeper, an unparsable override).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        given = [f"{k}={v}" for k, v in params.items()]
        given += list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
        overrides = OverridesParser.create().parse_overrides(given)
        batches = BasicSweeper.split_arguments(overrides, None)
    except Exception:  # noqa: BLE001 - a progress line is best effort, never a failure
        return None
    return sum(len(batch) for batch in batches)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
