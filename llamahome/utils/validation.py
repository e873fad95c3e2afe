"""Check config values before anything heavy loads, naming the key that is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llamahome.errors import ConfigError, LlamaHomeError


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg[key])``, with failures reported as ConfigError naming ``key``.

    Lists and dicts reach constructors as plain Python containers (``_convert_="all"``):
    peft, transformers and torch serialise or type-check them and reject ``ListConfig``.
    LlamaHome's own validation errors (raised inside constructors) pass through unchanged.
    """
    node = OmegaConf.select(cfg, key)
    if node is None or (isinstance(node, DictConfig) and len(node) == 0):
        return None
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, LlamaHomeError):
            raise cause from None
        raise ConfigError(f"{key}: {_message(cause or err)}") from err
    except LlamaHomeError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {_message(err)}") from err


def check_optimizer(cfg: DictConfig) -> None:
    """Build the optimizer (and scheduler) on a dummy parameter: bad lr/betas fail now, not later."""
    import torch

    lr = OmegaConf.select(cfg, "optim.lr")
    if lr is not None and not (isinstance(lr, int | float) and lr > 0):
        raise ConfigError(f"optim.lr must be a positive number, got {lr!r}.")
    factory = build(cfg, "optim")
    try:
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optim: {_message(err)}") from err
    scheduler = build(cfg, "scheduler")
    if scheduler is not None:
        try:
            scheduler(optimizer, num_training_steps=10)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"scheduler: {_message(err)}") from err


def check_trainer(cfg: DictConfig) -> None:
    """The few Trainer values that must be sane before a long model load."""
    trainer = cfg.trainer
    if trainer.get("max_steps", -1) in (0,) or (
        trainer.get("max_steps", -1) < 0 and trainer.get("max_epochs", -1) in (None, -1, 0)
    ):
        raise ConfigError("trainer.max_steps must be > 0 (or set trainer.max_epochs).")
    vci = trainer.get("val_check_interval")
    if isinstance(vci, int | float) and vci <= 0:
        raise ConfigError(f"trainer.val_check_interval must be > 0, got {vci}.")


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``last`` means this run dir's ``checkpoints/last.ckpt``; a path must exist."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "last":
        path = Path(output_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path=last but {path} does not exist: resume with the old run dir, "
                "e.g. `hydra.run.dir=outputs/train/runs/<time> ckpt_path=last`."
            )
        return str(path)
    if Path(ckpt_path).is_dir():
        raise ConfigError(f"ckpt_path={ckpt_path} is a directory; give the .ckpt file in it.")
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist.")
    return str(ckpt_path)


def _message(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__
