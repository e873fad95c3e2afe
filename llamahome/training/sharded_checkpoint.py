"""Sharded (FSDP) checkpoints: one directory of per-rank shards, swapped in whole, checked first.

The layout is Lightning's ``ModelParallelStrategy`` format, written with
``torch.distributed.checkpoint`` (DCP)::

    last.ckpt/
      __0_0.distcp, __1_0.distcp, ...   each rank's shards of the weights and optimizer state
      .metadata                         DCP's index: every tensor's name and global shape
      meta.pt                           loops, callbacks, schedulers, global step (rank 0)

Every rank writes its shards at once, so nothing is ever gathered on one rank. Unlike Lightning,
which writes into the old directory in place, :func:`save` fills a temporary sibling and swaps
it in (``utils.paths.replace_dir``): a kill mid-write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamahome.errors import ConfigError
from llamahome.utils.paths import atomic_write, replace_dir, restore_replaced_dir

if TYPE_CHECKING:  # torch loads in the functions: resolve_ckpt_path runs before it (start-up)
    import torch

#: Lightning's name for the non-tensor state in a sharded checkpoint
#: (``lightning.fabric.utilities.load._METADATA_FILENAME``).
META_FILE = "meta.pt"
_TEMP_SUFFIX = ".tmpdir"
_MODEL_KEY = "state_dict"


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint directory (Lightning's test: it has meta.pt)."""
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def save(checkpoint: dict[str, Any], path: str | os.PathLike, strategy: Any) -> None:
    """Write ``checkpoint`` as a sharded directory at ``path``; every rank must call this.

    Args:
        checkpoint: Lightning's checkpoint dict on this rank; ``state_dict`` and
            ``optimizer_states`` hold this rank's shards (``DTensor``) and are popped.
        path: The target directory (the same on every rank).
        strategy: The running strategy (rank, broadcast, barrier).
    """
    import torch
    from torch.distributed.checkpoint import save as save_shards

    target = Path(path)
    temp = None
    if strategy.is_global_zero:
        restore_replaced_dir(target)
        _remove_stale_temps(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=target.parent)
        os.chmod(temp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide it from the group
    temp_dir = Path(strategy.broadcast(temp))
    shards = {_MODEL_KEY: checkpoint.pop(_MODEL_KEY)}
    for index, state in enumerate(checkpoint.pop("optimizer_states", [])):
        shards[f"optimizer_{index}"] = state
    save_shards(shards, checkpoint_id=temp_dir)  # collective; files are fsynced
    if strategy.is_global_zero:
        with atomic_write(temp_dir / META_FILE) as file:
            torch.save(checkpoint, file)
        replace_dir(temp_dir, target)
    strategy.barrier()  # nobody reads or writes the next checkpoint before this one is in place


def load_partial(
    path: str | os.PathLike, module: torch.nn.Module, optimizers: Sequence[Any], weights_only: Any
) -> dict[str, Any]:
    """Load a sharded checkpoint that holds only the trainable weights (LoRA) into ``module``.

    Lightning's loader asks DCP for every parameter, and DCP fails on the frozen base weights
    that a LoRA checkpoint leaves out; those come from ``model.pretrained`` on every start.

    Args:
        path: The checkpoint directory.
        module: The sharded LightningModule (its ``state_dict`` keys are the checkpoint's).
        optimizers: Its optimizers, in ``configure_optimizers`` order.
        weights_only: Passed to ``torch.load`` for ``meta.pt``.

    Returns:
        The non-tensor state (``meta.pt``), as Lightning's own loader returns it.

    Raises:
        ConfigError: A trainable parameter has no tensor in the checkpoint.
    """
    import torch
    from torch.distributed.checkpoint import load as load_shards
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    directory = Path(path)
    saved = saved_shapes(directory)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable - saved.keys())
    if missing:
        raise ConfigError(
            f"ckpt_path={directory}: lacks {len(missing)} trainable tensors of this run (e.g. "
            f"{missing[0]!r}); resume with the peft settings the checkpoint was trained with"
        )
    state = {k: v for k, v in get_model_state_dict(module).items() if k in saved}
    load_shards({_MODEL_KEY: state}, checkpoint_id=directory)  # in place, into the shards
    set_model_state_dict(module, state, options=StateDictOptions(strict=False))
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        optim_state = {key: get_optimizer_state_dict(module, optimizer)}
        load_shards(optim_state, checkpoint_id=directory)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key])
    return torch.load(directory / META_FILE, weights_only=weights_only)


def saved_shapes(path: str | os.PathLike) -> dict[str, torch.Size]:
    """The model tensors a sharded checkpoint holds, with their global (unsharded) shapes.

    Read from DCP's index alone: no shard is opened and no process group is needed.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = f"{_MODEL_KEY}."
    return {
        key[len(prefix) :]: meta.size
        for key, meta in index.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }


def check_sharded(path: str | os.PathLike, expected: Mapping[str, torch.Tensor], run: str) -> int:
    """Check that a sharded checkpoint can resume this run, as ``ckpt_check`` does for files.

    Args:
        path: The checkpoint directory.
        expected: What the run would save (``ckpt_check.expected_state``).
        run: How to name the run in messages.

    Returns:
        The checkpoint's global step.

    Raises:
        ConfigError: An unreadable index or ``meta.pt``, or a different model or peft setting.
    """
    import torch

    from llamahome.training.ckpt_check import compare_with_run

    where = f"ckpt_path={path}"
    meta = _read_meta(Path(path))
    try:
        shapes = saved_shapes(path)
    except Exception as err:  # noqa: BLE001 - unpickling a damaged index fails in many ways
        raise ConfigError(
            f"{where}: the shard index (.metadata) is missing or damaged ({type(err).__name__}); "
            "an interrupted copy? Resume from an intact checkpoint"
        ) from None
    saved = {name: torch.empty(size, device="meta") for name, size in shapes.items()}
    compare_with_run(saved, expected, where, run)
    return int(meta["global_step"])


def _read_meta(directory: Path) -> Mapping[str, Any]:
    import torch

    file = directory / META_FILE
    try:
        meta = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        # Only the type: torch's message may advise weights_only=False, which runs the file's code.
        raise ConfigError(
            f"ckpt_path={directory}: {META_FILE} is unreadable or holds objects that safe loading "
            f"(weights_only=True) refuses ({type(err).__name__}); resume only from checkpoints "
            "this project wrote"
        ) from None
    if not isinstance(meta, Mapping) or "global_step" not in meta:
        raise ConfigError(
            f"ckpt_path={directory}: {META_FILE} has no global_step; not a Lightning checkpoint"
        )
    return meta


def _remove_stale_temps(target: Path) -> None:
    # A rank killed mid-save leaves its temporary directory behind; one save runs at a time.
    for stale in target.parent.glob(f".{target.name}.*{_TEMP_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
