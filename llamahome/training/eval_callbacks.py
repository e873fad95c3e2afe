"""Lightning callbacks that evaluate during training, with the run's own KV-cache policy.

- :class:`StreamingPerplexityCallback`: fine-tuning is judged with the cache it will serve with:
  ``cache=h2o`` in the train command makes ``val/streaming_ppl`` the perplexity under H2O
  eviction, next to the usual ``val/ppl`` of a plain forward pass.
- :class:`HeldOutGeneration`: answers held-out validation prompts before and after fit and logs
  ROUGE and exact match.

The scoring itself lives in ``llamahome.evaluation`` (no Lightning there); these are the hooks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from llamahome.evaluation.heldout import generate_answers, heldout_examples, score_texts
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
        from llamahome.kvcache.spec import CacheSpec

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


class HeldOutGeneration(Callback):
    """Answer held-out validation prompts before and after fit; log ROUGE and exact match.

    Logs ``heldout/rouge1``, ``heldout/rougeL``, ``heldout/exact_match`` and the same with a
    ``_before`` suffix, to the loggers and to ``trainer.callback_metrics`` (so ``train()``
    returns them), and writes prompts, references and both answers to
    ``<trainer.default_root_dir>/heldout_samples.json``. Skipped under ``fast_dev_run`` and
    when resuming a fit (no honest "before").

    Args:
        num_samples: Held-out examples (the first validation rows).
        max_new_tokens: Tokens generated per answer.
        batch_size: Prompts per generate call.
        generate_kwargs: More ``model.generate`` arguments, the same before and after, e.g.
            ``{no_repeat_ngram_size: 4}``: small models decode greedily into loops, and a loop
            scores on ROUGE as noise, not as what the model learned.
    """

    def __init__(
        self,
        num_samples: int = 16,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generate_kwargs = dict(generate_kwargs or {})
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.samples: list[dict[str, str]] = []
        self._pairs: list[tuple[list[int], list[int]]] = []
        self._answers_before: list[str] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        """Pick the held-out examples and score the model as it is before training."""
        if self._skip(trainer, pl_module) or trainer.ckpt_path:
            return
        self._pairs = heldout_examples(trainer.datamodule.val_dataloader(), self.num_samples)
        self.before, self._answers_before = self._score(pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Score again, log before/after, and keep the answers in ``samples``."""
        if self._skip(trainer, pl_module) or not self._pairs:
            return
        self.after, predictions = self._score(pl_module)
        tokenizer = pl_module.tokenizer
        answers = zip(self._pairs, self._answers_before, predictions, strict=True)
        self.samples = [
            {
                "prompt": tokenizer.decode(p, skip_special_tokens=True),
                "reference": tokenizer.decode(r, skip_special_tokens=True),
                "before": before,
                "after": after,
            }
            for (p, r), before, after in answers
        ]
        metrics = {f"heldout/{k}": v for k, v in self.after.items()}
        metrics |= {f"heldout/{k}_before": v for k, v in self.before.items()}
        self._publish(trainer, metrics)

    @staticmethod
    def _skip(trainer, pl_module) -> bool:
        no_data = trainer.datamodule is None or pl_module.tokenizer is None
        return bool(trainer.fast_dev_run) or no_data

    def _score(self, pl_module) -> tuple[dict[str, float], list[str]]:
        tokenizer = pl_module.tokenizer
        predictions = generate_answers(
            pl_module.model,
            tokenizer,
            [p for p, _ in self._pairs],
            self.max_new_tokens,
            batch_size=self.batch_size,
            cache_spec=getattr(pl_module, "cache_spec", None),
            **self.generate_kwargs,
        )
        references = [tokenizer.decode(r, skip_special_tokens=True).strip() for _, r in self._pairs]
        return score_texts(predictions, references), predictions

    @rank_zero_only
    def _publish(self, trainer, metrics: dict[str, float]) -> None:
        # on_fit_end cannot self.log(); write to the loggers and to callback_metrics directly.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        path = Path(trainer.default_root_dir) / "heldout_samples.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"before": self.before, "after": self.after, "samples": self.samples}
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
        log.info(
            "held-out (%d examples): rougeL %.4f -> %.4f, rouge1 %.4f -> %.4f, "
            "exact match %.3f -> %.3f",
            len(self._pairs),
            self.before["rougeL"],
            self.after["rougeL"],
            self.before["rouge1"],
            self.after["rouge1"],
            self.before["exact_match"],
            self.after["exact_match"],
        )
