"""Lightning logger factories whose behaviour depends on the environment (W&B online/offline)."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from llamahome.utils.tracking import remember_run_id, run_fields, saved_run_id, wandb_offline

log = logging.getLogger(__name__)


def wandb_logger(
    save_dir: str, offline: bool | None = None, group: str | None = None, **kwargs: Any
) -> WandbLogger:
    """A ``WandbLogger`` that goes offline by itself when no API key is configured.

    The run id is kept in ``<save_dir>/wandb_run_id.txt``, so a resumed job (same run dir)
    continues the same W&B run instead of starting a new one.

    Args:
        save_dir: The run directory.
        offline: Force offline (``True``) or online (``False``); ``None`` decides from
            ``WANDB_MODE`` and whether ``WANDB_API_KEY`` or a netrc login exists.
        group: The W&B group; ``None`` is the run name, and in a Hydra multirun the run name
            plus the sweep dir's name, so every job of one sweep lands in one group.
        **kwargs: ``WandbLogger`` arguments (project, name, job_type, tags, ...).

    Returns:
        A configured ``lightning.pytorch.loggers.WandbLogger``.
    """
    kwargs.update(run_fields(group, kwargs.get("name"), kwargs.get("tags")))
    offline = wandb_offline(offline)
    run_id = saved_run_id(save_dir)
    if run_id:
        kwargs.setdefault("id", run_id)
        kwargs.setdefault("resume", "allow")
    if offline:
        log.info("W&B is offline: sync later with `wandb sync %s/wandb/offline-run-*`", save_dir)
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)


def remember_wandb_run(logger: WandbLogger) -> None:
    """Write the logger's run id next to the run so a resume attaches to the same run."""
    try:
        run_id = logger.experiment.id
    except Exception:  # noqa: BLE001 - a disabled run has no id; nothing to remember
        return
    remember_run_id(logger.save_dir, run_id)


def remember_wandb_runs(loggers: list[Any]) -> None:
    """Keep the run id of every W&B logger among ``loggers`` next to its run (see above)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            remember_wandb_run(logger)
