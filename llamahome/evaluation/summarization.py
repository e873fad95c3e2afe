"""Summarization with a KV-cache policy, scored with ROUGE-1/2/L (``rouge-score``).

Records are JSON lines ``{"document": ..., "summary": ...}``: the XSUM / CNN-DM shape that the
H2O paper and llama-recipes' H2O scripts evaluate on (CNN-DM's ``article``/``highlights`` work
with ``task.document_key=article task.summary_key=highlights``). The model summarises each
document greedily with a fresh cache; the score is the mean F1 of each ROUGE variant against the
reference (stemmed, as the H2O evaluation does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamahome.errors import ConfigError, DataError
from llamahome.evaluation.base import (
    KVMeter,
    Outcome,
    Stopwatch,
    generate_batch,
    positive_int,
    progress,
)
from llamahome.model.context import check_length, context_length
from llamahome.model.generation import format_prompts

# The shipped fixture: short original news-style articles with one-sentence summaries.
DEFAULT_FILE = Path(__file__).with_name("resources") / "summaries.jsonl"
DEFAULT_PROMPT = "Summarize the following article in one sentence.\n\n{document}"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def load_records(
    path: str | Path, document_key: str = "document", summary_key: str = "summary"
) -> list[dict[str, str]]:
    """Read ``{document, summary}`` JSON lines, checking every line.

    Args:
        path: The JSONL file.
        document_key: The field holding the text to summarise.
        summary_key: The field holding the reference summary.

    Returns:
        ``[{"document": ..., "summary": ..., "line": n}, ...]`` in file order.

    Raises:
        DataError: The file is missing or has no records, or a line is not JSON, not an object,
            or lacks a non-empty string document/summary (names the file and line).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"task.data_file={str(path)!r} does not exist (or is not a file).")
    from llamahome.data import read_text

    lines = read_text(path).split("\n")  # not splitlines(): U+2028 is JSON
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}).") from err
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected a JSON object with {document_key!r} and {summary_key!r}."
            )
        for key in (document_key, summary_key):
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                present = ", ".join(sorted(record)) or "none"
                raise DataError(
                    f"{where}: missing or empty {key!r} (fields present: {present}); each line "
                    f"needs {document_key!r} and {summary_key!r} strings."
                )
        records.append(
            {"document": record[document_key], "summary": record[summary_key], "line": number}
        )
    if not records:
        raise DataError(
            f"{path}: no records; give JSON lines with {document_key!r} and {summary_key!r}."
        )
    return records


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (stemmed) of predictions against references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / max(1, len(predictions)) for name, total in totals.items()}


class Summarization:
    """The ``task=summarization`` config: data file, prompt, generation length.

    Args:
        name: The task name in result rows.
        data_file: JSONL of documents and reference summaries; ``None`` for the shipped fixture.
        document_key: Field with the document.
        summary_key: Field with the reference summary.
        prompt: Prompt template with ``{document}``.
        max_new_tokens: Summary length cap.
        max_samples: Use the first n records (``None``: all).
        batch_size: Documents per generate() call.
        chat: Use the tokenizer's chat template (instruct models).
        metric: The headline ROUGE variant (rouge1, rouge2 or rougeL).
        show_progress: Progress bar over batches.

    Raises:
        ConfigError: A value out of range (names ``task.<key>``).
        DataError: The data file is missing or malformed (names the file and line).
    """

    def __init__(
        self,
        name: str = "summarization",
        data_file: str | None = None,
        document_key: str = "document",
        summary_key: str = "summary",
        prompt: str = DEFAULT_PROMPT,
        max_new_tokens: int = 48,
        max_samples: int | None = None,
        batch_size: int = 4,
        chat: bool = True,
        metric: str = "rougeL",
        show_progress: bool = True,
    ) -> None:
        self.name = name
        if "{document}" not in prompt:
            raise ConfigError("task.prompt must contain {document} (where the article goes).")
        if metric not in ROUGE_TYPES:
            raise ConfigError(f"task.metric={metric!r} must be one of {', '.join(ROUGE_TYPES)}.")
        self.prompt = prompt
        self.metric = metric
        self.max_new_tokens = positive_int("task.max_new_tokens", max_new_tokens)
        self.batch_size = positive_int("task.batch_size", batch_size)
        self.chat = bool(chat)
        self.show_progress = show_progress
        self.data_file = str(data_file) if data_file else str(DEFAULT_FILE)
        self.records = load_records(self.data_file, document_key, summary_key)
        if max_samples is not None:
            self.records = self.records[: positive_int("task.max_samples", max_samples)]

    def check_context(self, context: int | None, cache_spec: Any = None) -> None:
        """Nothing to check before loading: document lengths need the tokenizer (see ``run``)."""

    def check_documents(self, tokenizer: Any, context: int | None) -> None:
        """Refuse a document whose prompt plus summary would not fit the model's context."""
        if context is None:
            return
        prompts = format_prompts(
            tokenizer, [self.prompt.format(document=r["document"]) for r in self.records],
            chat=self.chat,
        )
        for record, prompt in zip(self.records, prompts, strict=True):
            tokens = len(tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"])
            check_length(
                f"task.data_file={self.data_file} line {record['line']}", tokens, context,
                self.max_new_tokens, "the summary (task.max_new_tokens)",
                hint="shorten the document, or use a model with a longer context",
            )

    def run(self, model: Any, tokenizer: Any, cache_spec: Any) -> Outcome:
        """Summarise every record with a fresh cache per batch; mean ROUGE F1."""
        self.check_documents(tokenizer, context_length(model.config))
        meter, watch = KVMeter(), Stopwatch()
        predictions: list[str] = []
        tokens = 0
        size = self.batch_size
        batches = [self.records[i : i + size] for i in range(0, len(self.records), size)]
        for batch in progress(batches, len(batches), "summarization", self.show_progress):
            prompts = [self.prompt.format(document=r["document"]) for r in batch]
            with watch:
                texts, used = generate_batch(
                    model, tokenizer, prompts, cache_spec, self.max_new_tokens, self.chat, meter
                )
            tokens += used
            predictions.extend(t.strip() for t in texts)
        scores = rouge(predictions, [r["summary"] for r in self.records])
        return Outcome(
            metric=self.metric,
            value=scores[self.metric],
            higher_is_better=True,
            extras={
                **scores,
                "documents": len(self.records),
                "data_file": self.data_file,
                "example": predictions[0] if predictions else "",
            },
            kv_bytes=meter.kv_bytes,
            full_kv_bytes=meter.full_kv_bytes,
            tokens=tokens,
            seconds=watch.seconds,
            evicted=meter.evicted,
            keep_ratio=meter.keep_ratio,
        )
