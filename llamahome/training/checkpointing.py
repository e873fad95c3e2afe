"""Fault tolerance: atomic checkpoint files, a checkpoint on SIGTERM, and resumable data order.

Three pieces, each on Lightning's own extension points:

- :class:`AtomicCheckpointIO` (a ``CheckpointIO`` plugin, ``trainer.plugins``): a checkpoint
  file is written next to its target, fsynced and renamed over it, so a kill at any moment
  leaves either the previous complete file or the new complete file, never a truncated one.
- :class:`PreemptionCheckpoint` (a callback): Lightning turns SIGTERM (SLURM preemption,
  ``kill``, ``docker stop``) into a ``SIGTERMException`` at the next batch boundary; this
  callback then writes ``last.ckpt``, so ``ckpt_path=last`` continues from that very step.
- :class:`ResumableTrainData` (a callback): the train loader continues mid-epoch where the
  checkpoint left it, in the same order, instead of replaying the epoch from its first batch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import signal
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from llamahome.utils.paths import atomic_write, remove_stale_temps

log = logging.getLogger(__name__)

#: Exit status after a SIGTERM-triggered checkpoint: the shell convention for "killed by SIGTERM",
#: so schedulers and scripts see an interrupted job, not a finished one.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


# ------------------------------------------------------------------------------ atomic files
class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the target's directory, then rename it.

    Lightning's own ``TorchCheckpointIO`` serialises to memory first, but then streams the
    bytes into the target path (through a temporary file in the system temp dir, moved by
    copy when that is another filesystem), so a kill during the write can leave a truncated
    ``last.ckpt``. Here the temporary file lives in the same directory (so the rename is an
    atomic ``rename(2)`` on POSIX), is fsynced before the rename, and the directory is fsynced
    after it, so the new name survives a power loss too. Remote paths (``s3://``...) fall back
    to Lightning's behaviour: object stores publish an object only once its upload completes.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Save ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: The state Lightning assembled (model, optimizers, loops, callbacks).
            path: Target file.
            storage_options: Not supported (as in ``TorchCheckpointIO``).

        Raises:
            TypeError: If ``storage_options`` is given.
        """
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        remove_stale_temps(path)
        # One writer per target is Lightning's contract (global rank 0).
        with atomic_write(path) as file:
            self._write(checkpoint, file, Path(path))

    def _write(self, checkpoint: dict[str, Any], file: BinaryIO, target: Path) -> None:
        """Serialise into the open temporary file for ``target`` (a seam for tests)."""
        torch.save(checkpoint, file)


def _is_local(path: str | os.PathLike) -> bool:
    # Plain paths only; URLs (file://, s3://, ...) go through fsspec as Lightning does.
    return "://" not in str(path)


# ------------------------------------------------------------------------------ SIGTERM
class PreemptionCheckpoint(Callback):
    """Save ``last.ckpt`` when the run is terminated with SIGTERM.

    Lightning's signal connector records SIGTERM and raises ``SIGTERMException`` after the
    current batch (all ranks at the same batch under DDP), then calls ``on_exception`` on every
    callback before the process exits. The checkpoint is therefore taken at a clean batch
    boundary, with the loop counters and the data position of that batch. Other exceptions are
    ignored on purpose: the state after, say, a non-finite loss is not worth resuming from.

    Args:
        dirpath: Where ``last.ckpt`` goes; ``None`` uses the ``ModelCheckpoint`` callback's
            directory (``<run dir>/checkpoints``), so ``ckpt_path=last`` finds it.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Write the checkpoint if ``exception`` is Lightning's SIGTERM signal."""
        from lightning.pytorch.trainer.states import TrainerFn

        if not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        path = self._last_path(trainer)
        checkpoint_callback = trainer.checkpoint_callback
        if isinstance(checkpoint_callback, ModelCheckpoint) and self.dirpath is None:
            # Recorded in the checkpoint's ModelCheckpoint state: the resumed run then keeps
            # overwriting this last.ckpt instead of versioning a new last-v1.ckpt beside it.
            checkpoint_callback.last_model_path = path
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"SIGTERM: saved {path} at global step {trainer.global_step}; "
            "resume with the same hydra.run.dir and ckpt_path=last."
        )

    def _last_path(self, trainer) -> str:
        callback = trainer.checkpoint_callback
        if self.dirpath is not None:
            directory = self.dirpath
        elif isinstance(callback, ModelCheckpoint) and callback.dirpath:
            directory = callback.dirpath
        else:
            directory = os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(
            directory, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
        )


@contextlib.contextmanager
def exit_on_preemption() -> Iterator[None]:
    """Turn Lightning's ``SIGTERMException`` into exit status 143 (128 + SIGTERM).

    ``SIGTERMException`` is a ``SystemExit`` without a code, which would exit with status 0 as
    if training had finished; a scheduler or wrapper script must see that it did not.
    """
    try:
        yield
    except SIGTERMException as err:
        log.warning("Terminated by SIGTERM; exiting with status %d.", PREEMPTED_EXIT_CODE)
        raise SystemExit(PREEMPTED_EXIT_CODE) from err


# ------------------------------------------------------------------------------ data position
class EpochSeededRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose order depends only on ``(seed, epoch)``.

    A plain ``RandomSampler`` draws each epoch from one generator that advances across epochs,
    so a process that resumes in epoch 3 would replay epoch 0's order. Lightning calls
    ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler`` every epoch, as it
    does for ``DistributedSampler`` (which already behaves like this). The sampler owns its
    generator: a ``DataLoader`` sharing one with its sampler also draws worker seeds from it,
    which would make the order depend on how often the loader was iterated.

    Args:
        data_source: The dataset.
        seed: Base seed.
        replacement: As in ``RandomSampler``.
        num_samples: As in ``RandomSampler``.
    """

    def __init__(
        self, data_source: Any, seed: int, replacement: bool = False, num_samples: int | None = None
    ) -> None:
        super().__init__(data_source, replacement, num_samples, generator=torch.Generator())
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        """Yield the epoch's permutation (seeded when iteration starts, so it is lazy)."""
        self.generator.manual_seed(self.seed + self.epoch)
        yield from super().__iter__()


class _SkipFirst:
    """The loader's index (batch) sampler minus the batches already consumed this epoch.

    Skipping happens on indices, before any sample is read or collated, so resuming late in a
    long epoch costs microseconds. The count is read from the loader when iteration starts,
    which also covers persistent workers (they re-iterate this same object every epoch).
    """

    def __init__(self, indices: Any, loader: ResumableDataLoader) -> None:
        self.indices = indices
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.indices), self.loader._skipping, None)

    def __len__(self) -> int:
        # The full epoch: Lightning counts the consumed batches itself after a restart.
        return len(self.indices)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that can start an epoch after its first ``n`` batches.

    Constructed like a ``DataLoader`` (Lightning may re-instantiate it with a
    ``DistributedSampler`` under DDP). :meth:`resume_at` makes the next iteration start at
    batch ``n`` of ``epoch``; later iterations are whole epochs again.
    """

    _skip_next = 0
    _skipping = 0

    def resume_at(self, epoch: int, batches: int) -> None:
        """Make the next iteration yield ``epoch``'s batches from index ``batches`` on."""
        self._skip_next = max(0, int(batches))
        for sampler in _samplers(self):
            set_epoch = getattr(sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def __iter__(self):
        """Start an epoch, skipping the batches a restored checkpoint had already consumed."""
        self._skipping, self._skip_next = self._skip_next, 0
        try:
            return super().__iter__()
        finally:
            self._skipping = 0

    @property
    def _index_sampler(self) -> _SkipFirst:
        return _SkipFirst(super()._index_sampler, self)


def _samplers(loader: DataLoader) -> list[Any]:
    found = [loader.sampler]
    inner = getattr(loader.batch_sampler, "sampler", None)
    if inner is not None and inner is not loader.sampler:
        found.append(inner)
    return found


def _epoch_seeded(sampler: Any) -> Any:
    # Only an exact RandomSampler with its own generator is replaced: anything else is the
    # user's (or Lightning's DistributedSampler) and keeps its own notion of epochs.
    if type(sampler) is not RandomSampler or sampler.generator is None:
        return sampler
    return EpochSeededRandomSampler(
        sampler.data_source,
        seed=sampler.generator.initial_seed(),
        replacement=sampler.replacement,
        num_samples=sampler._num_samples,
    )


def make_resumable(loader: Any) -> Any:
    """Rebuild a map-style ``DataLoader`` as a :class:`ResumableDataLoader`.

    Same dataset, collate function, workers and batching; a ``RandomSampler`` (also one inside
    a custom batch sampler) becomes an :class:`EpochSeededRandomSampler` with the same seed.
    Anything else (iterable datasets, already resumable loaders, non-loaders) is returned as is.

    Args:
        loader: What a ``train_dataloader()`` returned.

    Returns:
        The resumable loader, or ``loader`` unchanged.
    """
    if (
        not isinstance(loader, DataLoader)
        or isinstance(loader, ResumableDataLoader)
        or isinstance(loader.dataset, IterableDataset)
    ):
        return loader
    batching: dict[str, Any]
    if loader.batch_sampler is not None and loader.batch_size is None:
        # A custom batch sampler (e.g. length-grouped): keep it, re-seed the sampler it draws from.
        inner = getattr(loader.batch_sampler, "sampler", None)
        if inner is not None:
            loader.batch_sampler.sampler = _epoch_seeded(inner)
        batching = {"batch_sampler": loader.batch_sampler}
    elif loader.batch_sampler is not None:
        batching = {
            "batch_size": loader.batch_size,
            "sampler": _epoch_seeded(loader.sampler),
            "drop_last": loader.drop_last,
        }
    else:
        batching = {"batch_size": None, "sampler": _epoch_seeded(loader.sampler)}
    extra = {"pin_memory_device": loader.pin_memory_device} if loader.pin_memory_device else {}
    return ResumableDataLoader(
        loader.dataset,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        in_order=loader.in_order,
        **batching,
        **extra,
    )


class ResumableTrainData(Callback):
    """Resume the training data exactly where a checkpoint left it: same epoch, next batch.

    Lightning restores model, optimizer, scheduler and loop counters, but a plain map-style
    ``DataLoader`` restarts its epoch from the first batch, so a run resumed mid-epoch trains
    on the early batches twice and never sees the rest. This callback:

    1. wraps the datamodule's ``train_dataloader`` so that the loader is a
       :class:`ResumableDataLoader` with a ``(seed, epoch)``-determined order;
    2. stores ``{"epoch", "batches_consumed"}`` in every checkpoint, read from Lightning's own
       loop progress (the loader cannot count: Lightning prefetches a batch and workers run
       ahead, so "yielded" is not "trained on"), and the global RNG states (Python, NumPy,
       torch CPU/CUDA), which Lightning does not checkpoint;
    3. on resume, makes the loader skip the consumed batches (indices only, nothing is read)
       and restores the RNG states, so dropout (LoRA's ``lora_dropout``) draws the masks the
       uninterrupted run would have drawn.

    Works with DDP: each rank skips its own shard's batches (the per-rank count is the same);
    the RNG states are rank 0's, which ``seed_everything`` makes every rank's stream anyway.

    Why not torchdata's ``StatefulDataLoader``, whose state Lightning saves by itself: with
    lightning 2.6.6 and torchdata 0.11 it resumes exactly only mid-way through the first epoch.
    Resuming at an epoch's end retrained a whole extra epoch, and resuming in the second epoch
    drew another order (20 samples, batch 2, resumes at steps 3, 10 and 12: 1 of 3 exact, with
    and without workers). The position here comes from Lightning's own loop counters instead,
    which are right at every step; ``tests/test_resume.py`` holds it to that.
    """

    def __init__(self) -> None:
        self._trainer: Any = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Make the datamodule's training loader resumable (fit only)."""
        if stage != "fit":
            return
        self._trainer = trainer
        datamodule = trainer.datamodule
        if datamodule is None:
            log.debug("ResumableTrainData: no datamodule; loaders passed to fit() are left as is")
            return
        original = datamodule.train_dataloader
        if getattr(original, "_resumable", False):
            return

        def train_dataloader() -> Any:
            loaders = original()
            if isinstance(loaders, Mapping):
                return {k: make_resumable(v) for k, v in loaders.items()}
            if isinstance(loaders, list | tuple):
                return type(loaders)(make_resumable(v) for v in loaders)
            return make_resumable(loaders)

        train_dataloader._resumable = True  # type: ignore[attr-defined]
        datamodule.train_dataloader = train_dataloader
        # This callback is what makes the loader resumable; Lightning cannot see that and would
        # warn on every mid-epoch resume that "results may be unreliable".
        warnings.filterwarnings(
            "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
        )

    def state_dict(self) -> dict[str, Any]:
        """Epoch, batches consumed in it and RNG states, as of the step being checkpointed."""
        trainer = self._trainer
        if trainer is None:
            return {}
        consumed = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        epoch = int(trainer.current_epoch)
        if consumed >= trainer.num_training_batches:  # saved at the epoch's end: next one starts
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "batches_consumed": consumed, "rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the position until the training loader exists."""
        self._pending = dict(state_dict) if state_dict else None

    def on_train_start(self, trainer, pl_module) -> None:
        """Apply a restored position to the loader before the first training batch."""
        if not self._pending:
            return
        pending, self._pending = self._pending, None
        epoch, skip = pending["epoch"], pending["batches_consumed"]
        loaders = [
            dl for dl in _flatten(trainer.train_dataloader) if isinstance(dl, ResumableDataLoader)
        ]
        if not loaders:
            log.warning("ResumableTrainData: the train loader is not resumable; its epoch restarts")
            return
        for loader in loaders:
            loader.resume_at(epoch, skip)
        # Lightning created this epoch's iterator (and prefetched a batch) in fit_loop.setup_data,
        # which trainer.estimated_stepping_batches (LlamaLitModule.configure_optimizers) runs
        # before the checkpoint's loop state is restored. Create it again from the new position.
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None:
            iter(fetcher)
        # Last: creating the iterator above may draw a worker seed from the global generator.
        if pending.get("rng"):
            _set_rng_states(pending["rng"])
        rank_zero_info(f"Resuming training data at epoch {epoch}, batch {skip}.")


def _rng_states() -> dict[str, Any]:
    # Tensors, tuples and strings only: checkpoints stay loadable with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _flatten(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return [x for v in loaders.values() for x in _flatten(v)]
    if isinstance(loaders, Sequence) and not isinstance(loaders, DataLoader | str):
        return [x for v in loaders for x in _flatten(v)]
    return [loaders]
