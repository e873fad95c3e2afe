"""Score greedy answers to held-out prompts before and after fine-tuning (ROUGE, exact match).

The held-out examples are the first validation rows: whatever the format, a row's prompt is the
tokens before its first label and its reference answer is the labelled tokens, so this works
for alpaca, chat, samsum and pydoc data alike without knowing their templates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from llamahome.data import IGNORE_INDEX

log = logging.getLogger(__name__)



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
    from llamahome.model.generation import cache_kwarg

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
