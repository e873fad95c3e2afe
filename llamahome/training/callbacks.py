"""Lightning callbacks: progress, throughput/MFU, non-finite-loss guard, sample generation."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import (
    Callback,
    RichProgressBar,
    ThroughputMonitor,
    TQDMProgressBar,
)
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def progress_bar(refresh_rate: int = 1) -> Callback:
    """A rich progress bar on a terminal, a plain tqdm bar when output is a file or pipe."""
    if sys.stdout.isatty():
        return RichProgressBar(refresh_rate=refresh_rate, leave=True)
    return TQDMProgressBar(refresh_rate=refresh_rate)


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].size(0)


def _batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].numel()


class TokenThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` counting tokens and FLOPs, with MFU.

    Logs ``train/tokens_per_sec`` (``items_per_sec``), ``samples_per_sec``,
    ``train/device/flops_per_sec`` from :func:`batch_flops` (6N per token plus attention) and
    ``train/device/mfu`` wherever the device's peak FLOP/s is known: Lightning knows most NVIDIA
    GPUs; elsewhere (CPU) give ``peak_flops`` (``callbacks.throughput.peak_flops=2e12``).

    Args:
        window_size: Batches averaged per figure.
        peak_flops: Peak FLOP/s of one device, overriding Lightning's table (``None``: keep it).
        **kwargs: ``ThroughputMonitor`` arguments.
    """

    def __init__(
        self, window_size: int = 5, peak_flops: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(
            batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size, **kwargs
        )
        self.peak_flops = peak_flops
        self._tokens = 0
        self._wall_start: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Create the meters; declare ``flops_per_batch`` before the first (validation) batch."""
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = int(self.peak_flops)
            for meter in self._throughputs.values():
                meter.available_flops = self.available_flops
        # Lightning decides once, at the first batch of any stage, whether the module has
        # FLOPs; validation before fit would otherwise switch them off for the whole run.
        if not hasattr(pl_module, "flops_per_batch"):
            pl_module.flops_per_batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, *args: Any) -> None:
        """Tell the monitor this batch's FLOPs (used for MFU) and start the wall clock."""
        pl_module.flops_per_batch = batch_flops(pl_module, batch, backward=True)
        if self._wall_start is None:
            self._wall_start = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, *args)

    def on_validation_batch_start(self, trainer, pl_module, batch, *args: Any) -> None:
        """Forward-only FLOPs for validation batches."""
        pl_module.flops_per_batch = batch_flops(pl_module, batch, backward=False)
        super().on_validation_batch_start(trainer, pl_module, batch, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args: Any) -> None:
        """Count tokens for the end-of-fit summary."""
        self._tokens += _batch_tokens(batch) * trainer.world_size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)

    @property
    def tokens_per_second(self) -> float:
        """Average training tokens/s over the fit so far (all ranks)."""
        if self._wall_start is None:
            return 0.0
        return self._tokens / max(1e-9, time.perf_counter() - self._wall_start)


def batch_flops(pl_module: Any, batch: dict[str, torch.Tensor], backward: bool) -> int:
    """FLOPs of one batch: 2N per token forward plus attention (PaLM, appendix B); x3 with backward.

    ``N`` is the parameter count (``pl_module.num_params``); attention scores and their product
    with the values add ``4 * layers * hidden * seq_len`` per token forward.
    """
    ids = batch["input_ids"]
    tokens, seq_len = ids.numel(), ids.shape[-1]
    config = pl_module.model.config
    attention = 4 * config.num_hidden_layers * config.hidden_size * seq_len
    forward = tokens * (2 * pl_module.num_params + attention)
    return int(3 * forward if backward else forward)


class NonFiniteLossGuard(Callback):
    """Stop with a clear message the first time the training loss is NaN or infinite."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Raise if the step's loss is not finite (a silent NaN wastes the rest of the run)."""
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            from llamahome.errors import LlamaHomeError

            raise LlamaHomeError(
                f"Non-finite training loss ({float(loss)}) at step {trainer.global_step}: lower "
                "optim.lr, set trainer.gradient_clip_val, or use trainer.precision=bf16-mixed."
            )


class SampleGeneration(Callback):
    """Generate from fixed prompts with the run's KV-cache policy and log the text.

    Fine-tuning is then judged with the cache it will serve with (``cache=h2o`` etc.).

    Args:
        prompts: Prompts (the chat template is applied when the tokenizer has one).
        max_new_tokens: Tokens to generate per prompt.
        every_n_validations: Generate after every n-th validation; 0 = only at fit end.
    """

    def __init__(
        self, prompts: Sequence[str] = (), max_new_tokens: int = 24, every_n_validations: int = 0
    ) -> None:
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.every_n_validations = every_n_validations
        self._validations = 0
        self.samples: list[dict[str, Any]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        """Generate every n-th validation (never during the sanity check)."""
        if trainer.sanity_checking or self.every_n_validations <= 0:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._generate(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Generate once at the end of fit."""
        self._generate(trainer, pl_module)

    def _generate(self, trainer, pl_module) -> None:
        tokenizer = pl_module.tokenizer
        if not self.prompts or tokenizer is None or trainer.fast_dev_run:
            return
        from llamahome.model.generation import generate_text
        from llamahome.training.distributed import is_fully_sharded

        # A sharded (FSDP) model needs every rank in each forward; the text is the same on all.
        if not (trainer.is_global_zero or is_fully_sharded(pl_module.model)):
            return

        rows = generate_text(
            pl_module.model,
            tokenizer,
            self.prompts,
            cache_spec=pl_module.cache_spec,
            max_new_tokens=self.max_new_tokens,
        )
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        for prompt, text in zip(self.prompts, rows, strict=True):
            self.samples.append({"step": step, "prompt": prompt, "completion": text})
            log.info("sample @ step %d | %s -> %s", step, prompt, text.replace("\n", " ")[:200])
        from llamahome.training.run_logs import log_samples

        log_samples(trainer.loggers, self.samples, step)


class DataSummary(Callback):
    """Print what the data module prepared (samples, tokens, truncated) when fit starts."""

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module) -> None:
        """One table, once the data module's ``setup`` has run."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "summary"):
            return
        from llamahome.utils.rich_utils import print_table

        summary = {k: v for k, v in datamodule.summary().items() if not isinstance(v, dict)}
        print_table("Data", [{"key": k, "value": v} for k, v in summary.items()])
        if summary.get("truncated"):
            log.warning(
                "%d samples were truncated to data.max_seq_length=%s",
                summary["truncated"],
                summary.get("max_seq_length"),
            )
