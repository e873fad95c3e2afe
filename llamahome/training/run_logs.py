"""Loggers that keep a run's history across resumes, and what goes to them besides metrics.

- :class:`AppendingCSVLogger`: Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its
  directory is not empty, so the documented resume (same run dir, ``ckpt_path=last``) replaced
  the first run's rows. This one appends; when new metric keys appear it rewrites the file once
  with the widened header (atomically: temp file + rename), so old rows keep their values.
- :func:`log_run_hyperparams`: the config into every logger, and into TensorBoard's hparams
  view (Lightning writes that view only together with a metric).
- :func:`log_samples`: sample generations as a W&B table and as TensorBoard text.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

#: The TensorBoard hparams view needs a metric tag to show runs against; updated at fit end.
HP_METRIC = "hp/val_loss_best"


class _AppendingWriter(ExperimentWriter):
    """``ExperimentWriter`` that continues an existing ``metrics.csv`` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict[str, Any] = {}
        self._fs = _fs(log_dir)
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self._fs.makedirs(log_dir, exist_ok=True)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = [key for key in header if key]

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites in place: a kill mid-write would lose the whole history.
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        temp = self.metrics_file_path + ".tmp"
        with open(temp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, self.metrics_file_path)


def _fs(path: str) -> Any:
    from lightning.fabric.utilities.cloud_io import get_filesystem

    return get_filesystem(path)


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume: rows are appended, never replaced.

    Same arguments as ``lightning.pytorch.loggers.CSVLogger`` (``conf/logger/csv.yaml``).
    """

    @property
    def experiment(self) -> _FabricWriter:
        """The writer, created on first use in ``log_dir`` (rank 0 only, as in Lightning)."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def log_run_hyperparams(loggers: Sequence[Any], params: Mapping[str, Any]) -> None:
    """Give every logger the (redacted) config; TensorBoard also gets its hparams view.

    Args:
        loggers: The Trainer's loggers.
        params: The resolved, redacted config.
    """
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            # Without a metric Lightning writes hparams.yaml but no hparams summary, so the
            # HPARAMS tab stays empty. NaN until fit ends (finish_run_hyperparams).
            logger.log_hyperparams(dict(params), metrics={HP_METRIC: float("nan")})
        else:
            logger.log_hyperparams(dict(params))


def finish_run_hyperparams(loggers: Sequence[Any], best_val_loss: float, step: int) -> None:
    """Record the run's best validation loss as TensorBoard's hparams metric."""
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            logger.log_metrics({HP_METRIC: best_val_loss}, step=step)
            logger.save()


def log_samples(loggers: Sequence[Any], samples: Sequence[Mapping[str, Any]], step: int) -> None:
    """Send sample generations to the loggers: a W&B table, TensorBoard text.

    Args:
        loggers: The Trainer's loggers.
        samples: Every sample so far, dicts with ``step``, ``prompt`` and ``completion``.
        step: The global step of the newest samples.
    """
    columns = ["step", "prompt", "completion"]
    rows = [[s["step"], s["prompt"], s["completion"]] for s in samples]
    for logger in loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            logger.log_text(key="samples", columns=columns, data=rows)
        elif name == "TensorBoardLogger":
            newest = [r for r in rows if r[0] == step]
            text = "| step | prompt | completion |\n|---|---|---|\n" + "\n".join(
                f"| {s} | {_md(p)} | {_md(c)} |" for s, p, c in newest
            )
            logger.experiment.add_text("samples", text, global_step=step)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
