"""All W&B plumbing in one place: online or offline, the run id, the group, the config, finish.

Lightning's ``WandbLogger`` (train) and plain ``wandb.init`` (eval and its sweep report) both go
through these helpers, so every run decides offline mode, resumes its run id, groups a sweep's
jobs and redacts secrets from its config the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llamahome.utils.secrets import redact

RUN_ID_FILE = "wandb_run_id.txt"

__all__ = [
    "RUN_ID_FILE",
    "finish_run",
    "redacted_config",
    "remember_run_id",
    "run_fields",
    "saved_run_id",
    "start_run",
    "wandb_offline",
]


def wandb_offline(forced: bool | None = None) -> bool:
    """Offline unless an API key is configured (or ``forced``/``WANDB_MODE`` say otherwise)."""
    if forced is not None:
        return bool(forced)
    if os.environ.get("WANDB_MODE") in {"offline", "dryrun"}:
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def run_fields(group: str | None, name: str | None, tags: Any) -> dict[str, Any]:
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


def saved_run_id(save_dir: str | Path) -> str | None:
    """The W&B run id an earlier attempt of this run dir used (a resume continues it)."""
    id_file = Path(save_dir) / RUN_ID_FILE
    return id_file.read_text().strip() if id_file.is_file() else None


def remember_run_id(save_dir: str | Path, run_id: str | None) -> None:
    """Write the W&B run id next to the run so a resume attaches to the same run."""
    if run_id:
        Path(save_dir, RUN_ID_FILE).write_text(str(run_id))


def redacted_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without Hydra's own node and with every secret masked."""
    container = (
        OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    )
    container.pop("hydra", None)
    return redact(container)


def start_run(settings: Mapping[str, Any], save_dir: str | Path, job_type: str, config: Any = None):
    """``wandb.init`` for code without a Lightning Trainer (eval jobs, the sweep report).

    Args:
        settings: The ``logger.wandb`` node: project, name, group, tags, offline.
        save_dir: The run directory (W&B files go under it; the run id is kept there).
        job_type: W&B job type.
        config: The run config; it is redacted before it leaves the machine.

    Returns:
        The ``wandb`` run.
    """
    import wandb

    fields = run_fields(settings.get("group"), settings.get("name"), settings.get("tags"))
    run_id = saved_run_id(save_dir)
    run = wandb.init(
        project=settings.get("project") or "llamahome",
        dir=str(save_dir),
        job_type=job_type,
        mode="offline" if wandb_offline(settings.get("offline")) else "online",
        config=redacted_config(config) if config is not None else None,
        id=run_id,
        resume="allow" if run_id else None,
        reinit="finish_previous",
        **fields,
    )
    remember_run_id(save_dir, run.id)
    return run


def finish_run(failed: bool = False) -> None:
    """Close the current W&B run, if this process opened one, so the next job starts its own."""
    wandb = sys.modules.get("wandb")  # only if the job imported it
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
