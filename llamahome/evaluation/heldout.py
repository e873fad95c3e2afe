"""Score greedy answers to held-out prompts before and after fine-tuning (ROUGE, exact match).

The held-out examples are the first validation rows: whatever the format, a row's prompt is the
tokens before its first label and its reference answer is the labelled tokens, so this works
for alpaca, chat, samsum and pydoc data alike without knowing their templates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def heldout_examples(batches: Any, num_samples: int) -> list[tuple[list[int], list[int]]]:
    """Cut validation rows into ``(prompt ids, reference ids)`` pairs.

    Args:
        batches: An iterable of collated batches (``input_ids``, ``attention_mask``,
            ``labels``; packed batches also ``seq_lens``: only a row's first document is used).
        num_samples: How many pairs to return at most.

    Returns:
        Pairs whose prompt and reference are both non-empty, in loader order.
    """
    pairs: list[tuple[list[int], list[int]]] = []
    for batch in batches:
        for row in range(batch["input_ids"].size(0)):
            length = int(batch["attention_mask"][row].sum())
            if "seq_lens" in batch:
                length = int(batch["seq_lens"][row][0])
            ids = batch["input_ids"][row, :length].tolist()
            labels = batch["labels"][row, :length].tolist()
            answer = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
            if not answer or answer[0] == 0:
                continue  # nothing to prompt with, or a plain-text row with no prompt
            pairs.append((ids[: answer[0]], [ids[i] for i in answer]))
            if len(pairs) >= num_samples:
                return pairs
    return pairs


def score_texts(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 / ROUGE-L F1 and whitespace-normalised exact match.

    Args:
        predictions: Generated answers.
        references: Reference answers, aligned with ``predictions``.

    Returns:
        ``{"rouge1", "rougeL", "exact_match"}``, each in [0, 1].
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    totals = {"rouge1": 0.0, "rougeL": 0.0, "exact_match": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        totals["rouge1"] += scores["rouge1"].fmeasure
        totals["rougeL"] += scores["rougeL"].fmeasure
        totals["exact_match"] += float(" ".join(pred.split()) == " ".join(ref.split()))
    n = max(1, len(predictions))
    return {k: v / n for k, v in totals.items()}


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    cache_spec: Any = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy continuations of already tokenized prompts (left-padded in batches).

    Args:
        model: A causal LM (PEFT-wrapped is fine).
        tokenizer: Its tokenizer (pad id and decoding).
        prompts: Token ids per prompt, exactly as the model saw them in training.
        max_new_tokens: Tokens to generate per prompt.
        batch_size: Prompts per ``generate`` call.
        cache_spec: The run's KV-cache policy (``conf/cache``), or ``None`` for the default.
        **generate_kwargs: More ``model.generate`` arguments (``no_repeat_ngram_size``, ...).

    Returns:
        The decoded new text per prompt, special tokens dropped.
    """
    from llamahome.core.generation import cache_kwarg

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, prompt in enumerate(chunk):  # left padding: generation continues at the end
                ids[row, width - len(prompt) :] = torch.tensor(prompt)
                mask[row, width - len(prompt) :] = 1
            kwargs: dict[str, Any] = dict(generate_kwargs)
            if cache_spec is not None:
                seq_len = width + max_new_tokens  # ratio budgets: shares of the sequence
                kwargs[cache_kwarg()] = cache_spec.build(model.config, seq_len=seq_len)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                **kwargs,
            )
            texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [t.strip() for t in texts]


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
