"""Test-only callbacks and plugins, injected into real runs with Hydra overrides.

Subprocess runs import this module through ``PYTHONPATH=tests`` (see ``cli_env``), e.g.
``+callbacks.pause._target_=scaleout_helpers.PauseAtStep``; DDP's second rank inherits the
environment and the overrides, so it loads them too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from llamahome.training.checkpointing import AtomicCheckpointIO

PAUSE_MARK = "SCALEOUT-TEST paused at step"
TESTS = Path(__file__).resolve().parent


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for ``python -m llamahome.train`` subprocesses that use these helpers.

    One intra-op thread per process: a tiny model gains nothing from more, and on a shared
    2-core machine (or with two DDP ranks) oversubscribed threads make each step ~10x slower.
    """
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return {**env, **extra}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run in-process training with ``n`` intra-op threads (as the subprocesses use)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class PauseAtStep(Callback):
    """After optimizer step ``step``, print ``SCALEOUT-TEST paused at step <step>`` and stand
    still until SIGTERM or Ctrl-C sets Lightning's stop flag (or SIGKILL ends the process).

    A test that signals a run "at step N" must not depend on how fast it reads the run's
    output: a slow reader on a busy machine would let the run go on past the next checkpoint.
    Paused, the run is exactly at step ``step`` when the signal arrives, and Lightning stops at
    this batch boundary. ``max_s`` only bounds an orphaned process's life.
    """

    def __init__(self, step: int, max_s: float = 600.0) -> None:
        self.step = step
        self.max_s = max_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or not trainer.is_global_zero:
            return
        print(f"{PAUSE_MARK} {self.step}", flush=True)
        deadline = time.monotonic() + self.max_s
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.02)


class CrashAtStep(Callback):
    """Raise ``RuntimeError`` once ``global_step`` reaches ``step``: a job failing mid-training."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"crash on purpose at step {trainer.global_step}")


class DumpWeights(Callback):
    """Save every rank's final parameters (and its first batch) to ``<run dir>/rank<r>.pt``."""

    def __init__(self) -> None:
        self.first_batch: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = batch["input_ids"].detach().cpu().clone()

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt"
        torch.save(
            {"state": state, "first_batch": self.first_batch, "world_size": trainer.world_size},
            path,
        )


class SlowCheckpointIO(AtomicCheckpointIO):
    """Atomic IO that stalls halfway through its ``hold_on``-th write of ``last.ckpt``.

    Before stalling it creates ``<dir>/WRITING`` so the test knows the write is in progress and
    can SIGKILL the process exactly then. The bytes before the stall really are on disk (in the
    temporary file), as they would be for a large checkpoint being written.
    """

    def __init__(self, hold_on: int = 2, hold_s: float = 600.0) -> None:
        super().__init__()
        self.hold_on = hold_on
        self.hold_s = hold_s
        self.last_writes = 0

    def _write(self, checkpoint: dict[str, Any], file: Any, target: Path) -> None:
        if target.name != "last.ckpt":
            super()._write(checkpoint, file, target)
            return
        self.last_writes += 1
        if self.last_writes != self.hold_on:
            super()._write(checkpoint, file, target)
            return
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        file.write(data[: len(data) // 2])
        file.flush()
        os.fsync(file.fileno())
        (target.parent / "WRITING").write_text(target.name)
        print(f"SCALEOUT-TEST writing {target}", flush=True, file=sys.stdout)
        time.sleep(self.hold_s)
        file.write(data[len(data) // 2 :])


class StopAtStep(Callback):
    """Stop fit after optimizer step ``step`` (validation and its checkpoint still run there).

    Unlike ``trainer.max_steps=step`` the run keeps the schedule of the full ``max_steps``, so a
    resume continues exactly as the uninterrupted run would have.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class LossRecorder(Callback):
    """Record what data-parallel equivalence is judged on, in ``<run dir>``.

    - ``losses.jsonl`` (rank 0): each optimizer step's loss averaged over ranks, i.e. the loss
      of the global batch (every row of these runs carries the same number of label tokens);
    - ``layout<rank>.json``: world size, how each parameter is stored on this rank (class,
      local and global shape), and which parameters had a gradient at the first step.
    """

    def __init__(self) -> None:
        self._grads: dict[str, bool] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._grads is None:
            self._grads = {n: p.grad is not None for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")
        run = Path(trainer.default_root_dir)
        if trainer.is_global_zero:
            with open(run / "losses.jsonl", "a") as file:
                file.write(json.dumps({"step": trainer.global_step, "loss": float(loss)}) + "\n")
        layout = run / f"layout{trainer.global_rank}.json"
        if layout.exists() or self._grads is None:
            return
        params = {
            name: {
                "class": type(p).__name__,
                "local": list(getattr(p, "_local_tensor", p).shape),
                "global": list(p.shape),
                "trainable": p.requires_grad,
                "grad": self._grads.get(name, False),
            }
            for name, p in pl_module.named_parameters()
        }
        info = {"world_size": trainer.world_size, "params": params}
        layout.write_text(json.dumps(info))
