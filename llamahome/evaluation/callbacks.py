"""Training-time evaluation: streaming perplexity with the run's KV-cache policy.

Fine-tuning is judged with the cache it will serve with: ``cache=h2o`` in the train command makes
``val/streaming_ppl`` the perplexity under H2O eviction, next to the usual ``val/ppl`` of a plain
forward pass. Generated samples with the same cache come from the existing
``llamahome.training.callbacks.SampleGeneration`` (``callbacks.sample_generation``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from llamahome.evaluation.streaming_ppl import StreamingPerplexity, streaming_perplexity

log = logging.getLogger(__name__)


class StreamingPerplexityCallback(Callback):
    """Run ``streaming_ppl`` with ``pl_module.cache_spec`` every n-th validation.

    Logs ``val/streaming_ppl`` (and ``val/streaming_kv_share``, the KV bytes held against a
    full cache). Every rank computes it on the same text, so sharded models (FSDP) work; the
    value is identical on all ranks.

    Args:
        every_n_validations: Run after every n-th validation; 0 turns the callback off.
        text_file: A UTF-8 text file; ``None`` for the Python reference manual.
        length: Tokens scored per row (prefix + decoded).
        prefix: Tokens prefilled before decoding token by token.
        segments: Rows of the text, one batch.
    """

    def __init__(
        self,
        every_n_validations: int = 0,
        text_file: str | None = None,
        length: int = 512,
        prefix: int = 128,
        segments: int = 1,
    ) -> None:
        self.every_n_validations = int(every_n_validations)
        # Validates the values (and the file) when the callback is built, before training.
        self.task = StreamingPerplexity(
            text_file=text_file,
            length=length,
            prefix=prefix,
            segments=segments,
            show_progress=False,
        )
        self._validations = 0
        self._ids: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Score the text with the run's cache every n-th validation (never the sanity check)."""
        if trainer.sanity_checking or self.every_n_validations <= 0 or pl_module.tokenizer is None:
            return
        self._validations += 1
        if self._validations % self.every_n_validations:
            return
        from llamahome.core.cache import CacheSpec

        if self._ids is None:  # tokenize once per fit
            self._ids = self.task.input_ids(pl_module.tokenizer)
        spec = pl_module.cache_spec or CacheSpec()
        if spec.min_tokens:
            # This measures the policy itself: no floor, or a short text is never evicted.
            spec = dataclasses.replace(spec, min_tokens=0)
        outcome = streaming_perplexity(
            pl_module.model, self._ids, spec, min(self.task.prefix, self._ids.shape[1] - 1)
        )
        share = outcome.kv_bytes / outcome.full_kv_bytes if outcome.full_kv_bytes else 1.0
        pl_module.log("val/streaming_ppl", outcome.value, sync_dist=False)
        pl_module.log("val/streaming_kv_share", share, sync_dist=False)
        self.history.append(
            {"step": trainer.global_step, "ppl": outcome.value, "policy": spec.policy}
        )
        log.info(
            "streaming ppl @ step %d: %.3f (cache=%s, KV %.0f%% of full)",
            trainer.global_step,
            outcome.value,
            spec.policy,
            100 * share,
        )
