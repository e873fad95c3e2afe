"""Config adjustments that keep a run's logs and checkpoints useful, each announced in one line.

- :func:`clamp_log_every`: ``trainer.log_every_n_steps`` above ``trainer.max_steps`` would log
  no training loss and no learning rate at all.
- :func:`adapt_to_missing_validation`: ``data.val_fraction=0`` (or ``data.max_val_samples=0``,
  ``trainer.limit_val_batches=0``) means no validation, so ``validate_before_fit`` and the
  val-based ``ModelCheckpoint`` turn themselves off; ``last.ckpt`` is then written every
  ``trainer.val_check_interval`` training steps instead, so resume keeps working.
- :func:`check_sequence_length`: ``data.max_seq_length`` beyond the model's context would train
  on positions the model cannot use; refused before the model loads.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("llamahome.train")


def clamp_log_every(cfg: DictConfig) -> None:
    """Lower ``trainer.log_every_n_steps`` to ``trainer.max_steps`` when it is above it."""
    trainer = cfg.trainer
    every, max_steps = trainer.get("log_every_n_steps"), trainer.get("max_steps", -1)
    if isinstance(every, int) and isinstance(max_steps, int) and 0 < max_steps < every:
        log.warning(
            "trainer.log_every_n_steps=%d is above trainer.max_steps=%d: logging every %d "
            "steps instead, so train/loss and the learning rate are recorded.",
            every,
            max_steps,
            max_steps,
        )
        with open_dict(cfg):
            trainer.log_every_n_steps = max_steps


def no_validation_reason(cfg: DictConfig) -> str | None:
    """Why this run has no validation data (the key that says so), or ``None`` if it has some."""
    data = cfg.get("data") or {}
    has_val_source = data.get("val_path") is not None or data.get("val_split") is not None
    if data.get("val_fraction") == 0 and not has_val_source and data.get("format") != "custom":
        return "data.val_fraction=0"
    if data.get("max_val_samples") == 0:
        return "data.max_val_samples=0"
    if OmegaConf.select(cfg, "trainer.limit_val_batches") == 0:
        return "trainer.limit_val_batches=0"
    return None


def adapt_to_missing_validation(cfg: DictConfig) -> bool:
    """Turn off what needs validation data when there is none; warn once.

    Args:
        cfg: The composed train config (changed in place).

    Returns:
        Whether the run validates.
    """
    reason = no_validation_reason(cfg)
    if reason is None:
        return True
    interval = OmegaConf.select(cfg, "trainer.val_check_interval")
    every = interval if isinstance(interval, int) and interval > 0 else None
    log.warning(
        "%s: no validation; validate_before_fit and the val/loss checkpoint are off, "
        "last.ckpt is saved every %s.",
        reason,
        f"{every} steps" if every else "epoch",
    )
    with open_dict(cfg):
        cfg.validate_before_fit = False
        cfg.trainer.limit_val_batches = 0
        ckpt = OmegaConf.select(cfg, "callbacks.model_checkpoint")
        if ckpt is not None:
            ckpt.monitor = None
            ckpt.filename = "step{step:05d}"
            ckpt.save_top_k = 1
            ckpt.every_n_train_steps = every
            ckpt.save_on_train_epoch_end = every is None
    return False


def check_sequence_length(cfg: DictConfig, model_spec: Any) -> None:
    """Refuse ``data.max_seq_length`` beyond the model's context (read from its config alone).

    Raises:
        ConfigError: The sequence length exceeds ``max_position_embeddings`` (names both).
    """
    from llamahome.model.context import check_length, model_context

    length = OmegaConf.select(cfg, "data.max_seq_length")
    if isinstance(length, int) and not isinstance(length, bool):
        check_length(
            f"data.max_seq_length={length}", length, model_context(model_spec),
            hint="lower data.max_seq_length, or raise model.config.max_position_embeddings "
            "for a model trained from scratch",
        )
