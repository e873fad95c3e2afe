"""``task=ruler``: RULER-style synthetic long-context tasks, scored by string-match recall.

Prompts come from ``ruler_data.py`` (offline, deterministic by ``task.seed``, fitted to each
length in tokens of the model's tokenizer), the same for every policy. Each (subtask, length)
cell has ``task.samples`` prompts; a prompt's score is RULER's ``string_match_all``: the share of
its references found in the greedy answer (case-insensitive). The headline ``recall`` is the mean
over subtasks (each subtask weighs the same, as RULER averages tasks), with per-subtask and
per-length means as extra columns (``recall:vt``, ``recall:vt@1024``, ``recall@1024``).

Questions are protected by default (``task.question_protected``; see ``protocol.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from llamahome.errors import ConfigError
from llamahome.evaluation.base import (
    KVMeter,
    Outcome,
    Stopwatch,
    flag,
    int_list,
    positive_int,
    progress,
)
from llamahome.evaluation.protocol import answer, protocol_name
from llamahome.evaluation.ruler_data import (
    MAX_NEW_TOKENS,
    SUBTASKS,
    Sample,
    make_sample,
    string_match_all,
    token_counter,
)
from llamahome.model.context import check_length, context_length

log = logging.getLogger(__name__)


def check_prompt_lengths(
    lengths: Sequence[int], subtasks: Sequence[str], context: int | None
) -> None:
    """Refuse ``task.lengths`` whose longest prompt plus its answer exceeds the context.

    Prompts are fitted to each length (answer prefix included); the answer adds up to the
    subtask's ``MAX_NEW_TOKENS``.
    """
    reserved = max(MAX_NEW_TOKENS.get(subtask, 16) for subtask in subtasks)
    shown = ", ".join(map(str, lengths))
    check_length(f"task.lengths=[{shown}]", max(lengths), context, reserved)


class Ruler:
    """The ``task=ruler`` config.

    Args:
        name: The task name in result rows.
        subtasks: Any of ``niah_single niah_multikey niah_multivalue niah_multiquery vt cwe fwe``.
        lengths: Prompt lengths in tokens (1k-4k on CPU; up to the model's context).
        samples: Prompts per (subtask, length).
        batch_size: Prompts per forward (same subtask and length, so little padding).
        question_protected: Compress the context only, keep the question (kvpress's protocol);
            false compresses context and question together.
        chat: Use the chat template (off: the prompt ends with RULER's answer prefix).
        seed: Seeds the generation.
        freq_cw: Occurrences of each common word in ``cwe`` (lowered to fit short prompts).
        freq_ucw: Occurrences of each other word in ``cwe``.
        show_progress: Progress bar over batches.

    Raises:
        ConfigError: A value out of range (names ``task.<key>``).
    """

    def __init__(
        self,
        name: str = "ruler",
        subtasks: Sequence[str] = SUBTASKS,
        lengths: Sequence[int] = (1024,),
        samples: int = 2,
        batch_size: int = 2,
        question_protected: bool = True,
        chat: bool = False,
        seed: int = 0,
        freq_cw: int = 30,
        freq_ucw: int = 3,
        show_progress: bool = True,
    ) -> None:
        self.name = name
        subtasks = [subtasks] if isinstance(subtasks, str) else list(subtasks or [])
        unknown = [s for s in subtasks if s not in SUBTASKS]
        if unknown or not subtasks:
            raise ConfigError(
                f"task.subtasks={subtasks!r}: choose among {', '.join(SUBTASKS)}"
                + (f" ({unknown[0]!r} is not one)." if unknown else ".")
            )
        self.subtasks = subtasks
        self.lengths = int_list("task.lengths", lengths, 64)
        self.samples = positive_int("task.samples", samples)
        self.batch_size = positive_int("task.batch_size", batch_size)
        self.question_protected = flag("task.question_protected", question_protected)
        self.chat = bool(chat)
        self.seed = int(seed)
        self.options = {
            "freq_cw": positive_int("task.freq_cw", freq_cw, 2),
            "freq_ucw": positive_int("task.freq_ucw", freq_ucw),
        }
        self.show_progress = show_progress

    def make_samples(self, tokenizer: Any) -> list[Sample]:
        """Every prompt, in (subtask, length, index) order."""
        count = token_counter(tokenizer)
        return [
            make_sample(subtask, count, length, self.seed, i, **self.options)
            for subtask in self.subtasks
            for length in self.lengths
            for i in range(self.samples)
        ]

    def check_context(self, context: int | None, cache_spec: Any = None) -> None:
        """Refuse lengths beyond the model's context (``llamahome.eval``: before loading)."""
        check_prompt_lengths(self.lengths, self.subtasks, context)

    def run(self, model: Any, tokenizer: Any, cache_spec: Any) -> Outcome:
        """Answer every prompt with a fresh cache per batch; recall per subtask and length."""
        self.check_context(context_length(model.config), cache_spec)
        samples = self.make_samples(tokenizer)
        scores, tokens, meter, watch = score_samples(
            model,
            tokenizer,
            samples,
            cache_spec,
            self.batch_size,
            self.chat,
            self.question_protected,
            self.show_progress,
            self.name,
        )
        extras: dict[str, Any] = {
            "protocol": protocol_name(self.question_protected),
            "samples_per_cell": self.samples,
        }
        by_subtask = {}
        for subtask in self.subtasks:
            cell = [s for smp, s in zip(samples, scores, strict=True) if smp.subtask == subtask]
            by_subtask[subtask] = sum(cell) / len(cell)
            extras[f"recall:{subtask}"] = by_subtask[subtask]
            for length in self.lengths:
                got = [
                    s
                    for smp, s in zip(samples, scores, strict=True)
                    if smp.subtask == subtask and smp.length == length
                ]
                extras[f"recall:{subtask}@{length}"] = sum(got) / len(got)
        for length in self.lengths:
            extras[f"recall@{length}"] = sum(
                extras[f"recall:{s}@{length}"] for s in self.subtasks
            ) / len(self.subtasks)
        return Outcome.measured(
            "recall", sum(by_subtask.values()) / len(by_subtask), meter, watch, tokens, extras
        )


def score_samples(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Sample],
    cache_spec: Any,
    batch_size: int,
    chat: bool,
    question_protected: bool,
    show_progress: bool,
    desc: str,
) -> tuple[list[float], int, KVMeter, Stopwatch]:
    """Greedy answers to `samples`, batched within (subtask, length); each one's recall.

    Returns:
        The scores (in sample order), tokens processed, the KV meter and the model time.
    """
    meter, watch = KVMeter(), Stopwatch()
    groups: dict[tuple[str, int], list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault((sample.subtask, sample.length), []).append(i)
    batches = [
        (key, idx[i : i + batch_size])
        for key, idx in groups.items()
        for i in range(0, len(idx), batch_size)
    ]
    scores = [0.0] * len(samples)
    tokens = 0
    for (subtask, _), idx in progress(batches, len(batches), desc, show_progress):
        with watch:
            texts, used = answer(
                model,
                tokenizer,
                [samples[i].prompt for i in idx],
                cache_spec,
                MAX_NEW_TOKENS.get(subtask, 16),
                chat,
                question_protected,
                meter,
            )
        tokens += used
        for i, text in zip(idx, texts, strict=True):
            scores[i] = string_match_all(text, samples[i].answers)
            log.debug("%s: %r -> %.2f (%s)", subtask, text, scores[i], samples[i].answers)
    return scores, tokens, meter, watch
