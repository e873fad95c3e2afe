"""Logger factories whose behaviour depends on the environment (W&B online vs offline)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
RUN_ID_FILE = "wandb_run_id.txt"


def wandb_logger(
    save_dir: str, offline: bool | None = None, group: str | None = None, **kwargs: Any
):
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
    from lightning.pytorch.loggers import WandbLogger

    kwargs.update(_hydra_run_fields(group, kwargs.get("name"), kwargs.get("tags")))
    if offline is None:
        offline = os.environ.get("WANDB_MODE") in {"offline", "dryrun"} or not _has_wandb_key()
    id_file = Path(save_dir) / RUN_ID_FILE
    if id_file.is_file():
        kwargs.setdefault("id", id_file.read_text().strip())
        kwargs.setdefault("resume", "allow")
    if offline:
        log.info("W&B is offline: sync later with `wandb sync %s/wandb/offline-run-*`", save_dir)
    logger = WandbLogger(save_dir=save_dir, offline=offline, **kwargs)
    return logger


def _hydra_run_fields(group: str | None, name: str | None, tags: Any) -> dict[str, Any]:
    """W&B group, name and tags of this Hydra job: a multirun job is a run in its sweep's group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    tags = [str(t) for t in tags or []]
    fields: dict[str, Any] = {"group": group or name, "name": name, "tags": tags}
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return fields
    hydra_cfg = HydraConfig.get()
    sweep_id = Path(hydra_cfg.sweep.dir).name
    if group is None:
        fields["group"] = f"{name}-{sweep_id}" if name else sweep_id
    fields["name"] = f"{name}-{hydra_cfg.job.num}" if name else str(hydra_cfg.job.num)
    # The job's own overrides (optim.lr=0.0003, peft.r=16) make a sweep's runs filterable;
    # W&B caps a tag at 64 characters.
    fields["tags"] = tags + [o[:64] for o in hydra_cfg.overrides.task if not o.startswith("hydra")]
    return fields


def remember_wandb_run(logger) -> None:
    """Write the W&B run id next to the run so a resume attaches to the same run."""
    try:
        run_id = logger.experiment.id
    except Exception:  # noqa: BLE001 - a disabled run has no id; nothing to remember
        return
    Path(logger.save_dir, RUN_ID_FILE).write_text(str(run_id))


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
