"""Every check of a train config that can fail in seconds, before a model loads.

Trainer values, the learning rate, the optimizer on a dummy parameter, the fine-tuning method
with its memory and speed levers, the resume checkpoint path, and whether the trainer strategy
can launch here. Each raises a ``ConfigError`` that names the key, so a typo costs seconds, not
a model load.

Two tiers: :func:`check_trainer`, :func:`check_learning_rate` and :func:`resolve_ckpt_path` read
the config only and import nothing heavy, so ``train`` runs them before torch loads (a typo is
answered in about a second); :func:`check_optimizer`, :func:`check_finetuning` and
:func:`check_launchable` need torch or Lightning and run after them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llamahome.errors import ConfigError
from llamahome.utils.validation import build, error_message

__all__ = [
    "check_finetuning",
    "check_launchable",
    "check_learning_rate",
    "check_optimizer",
    "check_trainer",
    "resolve_ckpt_path",
    "shards_model",
]


def check_learning_rate(cfg: DictConfig) -> None:
    """Refuse an ``optim.lr`` that is not a positive number (without importing torch)."""
    lr = OmegaConf.select(cfg, "optim.lr")
    if lr is not None and not (
        isinstance(lr, int | float) and not isinstance(lr, bool) and lr > 0
    ):
        raise ConfigError(f"optim.lr must be a positive number, got {lr!r}.")


def check_optimizer(cfg: DictConfig) -> None:
    """Build the optimizer and scheduler on a dummy parameter: a bad value fails now, not later."""
    import torch

    from llamahome.training.schedules import make_schedule

    check_learning_rate(cfg)
    factory = build(cfg, "optim")
    try:
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optim: {error_message(err)}") from err
    scheduler = build(cfg, "scheduler")
    if scheduler is not None:
        try:
            make_schedule(scheduler, optimizer, 10)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"scheduler: {error_message(err)}") from err


def check_trainer(cfg: DictConfig) -> None:
    """The few Trainer values that must be sane before a long model load."""
    trainer = cfg.trainer
    for key in ("max_steps", "max_epochs", "log_every_n_steps"):
        value = trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"trainer.{key} must be an integer, got {value!r}.")
    if trainer.get("max_steps", -1) in (0,) or (
        trainer.get("max_steps", -1) < 0 and trainer.get("max_epochs", -1) in (None, -1, 0)
    ):
        raise ConfigError("trainer.max_steps must be > 0 (or set trainer.max_epochs).")
    vci = trainer.get("val_check_interval")
    if isinstance(vci, int | float) and vci <= 0:
        raise ConfigError(f"trainer.val_check_interval must be > 0, got {vci}.")


def resolve_ckpt_path(
    ckpt_path: str | None, output_dir: str | Path, shards: bool = False
) -> str | None:
    """``last`` means this run dir's ``checkpoints/last.ckpt``; a path must exist.

    A checkpoint is a file, or with ``trainer=fsdp|fsdp_sim`` a sharded directory (one shard
    file per rank, ``training/sharded_checkpoint.py``), ``last.ckpt`` included.

    Args:
        ckpt_path: ``None``, ``"last"`` or a path.
        output_dir: The run dir.
        shards: Whether the run's strategy shards the model (it can read sharded checkpoints).

    Returns:
        The checkpoint path, or ``None`` for a fresh start.

    Raises:
        ConfigError: Nothing there, a directory that is no sharded checkpoint, or a sharded
            checkpoint for a strategy that cannot read it.
    """
    from llamahome.training.sharded_checkpoint import is_sharded
    from llamahome.utils.paths import restore_replaced_dir

    if ckpt_path in (None, ""):
        return None
    last = ckpt_path == "last"
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if last else Path(ckpt_path)
    restore_replaced_dir(path)  # a kill between the two renames of a sharded save
    if last and not path.exists():
        raise ConfigError(
            f"ckpt_path=last but {path} does not exist: resume with the old run dir, "
            "e.g. `hydra.run.dir=outputs/train/runs/<time> ckpt_path=last`."
        )
    if path.is_dir():
        if not is_sharded(path):
            raise ConfigError(
                f"ckpt_path={ckpt_path} is a directory but not a sharded checkpoint (no meta.pt); "
                "give the .ckpt file in it."
            )
        if not shards:
            raise ConfigError(
                f"ckpt_path={ckpt_path} is a sharded checkpoint (a directory of per-rank shards "
                "written by trainer=fsdp or fsdp_sim): resume it with one of those trainers; "
                "the shards load onto any number of ranks (on one CPU: trainer=fsdp_sim "
                "trainer.devices=1)"
            )
        return str(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} does not exist.")
    return str(path)


def shards_model(cfg: DictConfig) -> bool:
    """Whether ``trainer.strategy`` shards the model (FSDP2: ``trainer=fsdp|fsdp_sim``)."""
    target = OmegaConf.select(cfg, "trainer.strategy._target_")
    if not isinstance(target, str):
        return False
    if target == "llamahome.training.distributed.FSDP2Strategy":
        return True  # without importing Lightning: config errors stay fast
    from hydra.utils import get_class
    from lightning.pytorch.strategies import ModelParallelStrategy

    try:
        return issubclass(get_class(target), ModelParallelStrategy)
    except (ImportError, ValueError, TypeError):
        return False  # a bad target fails when the trainer is built, naming it


def check_finetuning(cfg: Any, method: Any) -> Any:
    """Validate the fine-tuning method and the memory/speed levers before the model loads.

    Args:
        cfg: The composed train config (``trainer``, ``compile`` and ``model`` keys are read).
        method: What the ``peft`` group built.

    Returns:
        The ``BitsAndBytesConfig`` to load the base with (``peft=qlora``), else ``None``.

    Raises:
        ConfigError: QLoRA cannot run here or on a randomly initialised model; fp16 mixed
            precision on CPU; accumulation < 1; negative clipping; a bad ``compile`` value, or
            ``compile`` or QLoRA with FSDP.
    """
    import torch

    from llamahome.model.finetuning import (
        GPU_ONLY_PRECISIONS,
        QLoRA,
        compile_backend,
        require_qlora_support,
    )

    trainer = cfg.get("trainer") or {}
    accelerator = trainer.get("accelerator")
    no_gpu = not torch.cuda.is_available()
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and no_gpu)
    precision = trainer.get("precision")
    if on_cpu and precision in GPU_ONLY_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} (fp16 mixed precision) needs a CUDA GPU; on CPU use "
            "trainer.precision=bf16-mixed, bf16-true or 32-true."
        )
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches must be an integer >= 1, got {accumulate!r}."
        )
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (isinstance(clip, int | float) and clip >= 0):
        raise ConfigError(f"trainer.gradient_clip_val must be >= 0 or null, got {clip!r}.")
    if compile_backend(cfg.get("compile", False)) and shards_model(cfg):
        # The compiled forward is the model's own, outside its __call__: FSDP's hook that
        # gathers the root's weights (embeddings, head) would never run.
        raise ConfigError(
            f"compile={cfg.get('compile')} with an FSDP trainer (trainer=fsdp|fsdp_sim) is not "
            "supported: use compile=false"
        )
    rank = getattr(method, "r", None)  # peft fails on r=0 only once the model is wrapped
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"peft.r must be a positive integer, got {rank!r}.")
    if not isinstance(method, QLoRA):
        return None
    if shards_model(cfg):  # bitsandbytes' 4-bit weights are no tensors FSDP2 can shard
        raise ConfigError(
            "peft=qlora with an FSDP trainer (trainer=fsdp|fsdp_sim) is not supported: use "
            "peft=lora with trainer=fsdp, or peft=qlora with trainer=gpu|ddp"
        )
    model = cfg.get("model") or {}
    if model.get("pretrained") is None:
        raise ConfigError(
            "peft=qlora quantises pretrained weights, but model.pretrained is null (random "
            "init); use peft=lora or peft=none, or point model.pretrained at weights."
        )
    require_qlora_support(accelerator)
    return method.quantization_config()


def check_launchable(cfg: DictConfig) -> None:
    """Refuse trainer strategies that cannot start inside a local multirun job.

    Lightning starts ranks 1..N-1 of ``strategy=ddp`` by re-running ``sys.argv``: inside
    ``-m`` that is the whole sweep again, writing elsewhere. Under torchrun or SLURM (one task
    per device, e.g. ``hydra/launcher=submitit_slurm`` with ``tasks_per_node``) every rank
    already exists and nothing is re-launched.

    Raises:
        ConfigError: ``strategy=ddp`` (or FSDP, ``trainer=fsdp|fsdp_sim``) with more than one
            local device and no cluster launcher.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy", "auto")
    devices = trainer.get("devices", 1)
    if shards_model(cfg):  # FSDP2Strategy launches its ranks as ddp does
        strategy = OmegaConf.select(cfg, "trainer.strategy._target_").rsplit(".", 1)[-1]
    elif not isinstance(strategy, str) or not strategy.startswith("ddp") or "spawn" in strategy:
        return
    several = devices == -1 or devices == "auto" or (isinstance(devices, int) and devices > 1)
    if several and not (SLURMEnvironment.detect() or TorchElasticEnvironment.detect()):
        raise ConfigError(
            f"trainer.strategy={strategy} with trainer.devices={devices} cannot run inside a "
            "local multirun (Lightning re-launches the command line for the other ranks): use "
            "hydra/launcher=slurm (one task per device) or separate runs (docs/scale-out.md)."
        )
