"""``task=niah``: needle-in-a-haystack accuracy over a depth x length grid, drawn as a heat-map.

One RULER single-needle prompt per trial ("One of the special magic numbers for <key> is:
<7 digits>." in the noise haystack, asked for at the end), with the needle placed at each of
``task.depths`` (0 = first sentence, 1 = last) for each of ``task.lengths`` tokens. A trial is
right when the greedy answer contains the number. The row carries one accuracy per cell
(``accuracy@1024_d0.5``), and ``python -m llamahome.eval`` draws them as a PNG heat-map in the run
directory (``heatmap.py``); a sweep draws one per policy and budget in the sweep directory.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from llamahome.evaluation.base import Outcome, depth_list, flag, int_list, positive_int
from llamahome.evaluation.protocol import protocol_name
from llamahome.evaluation.ruler import check_prompt_lengths, score_samples
from llamahome.evaluation.ruler_data import (
    NEEDLE,
    Sample,
    fit,
    keys,
    niah_prompt,
    number,
    token_counter,
)
from llamahome.model.context import context_length


def make_trial(count: Any, length: int, depth: float, seed: int, index: int) -> Sample:
    """One needle prompt of about `length` tokens with its needle at `depth` (deterministic)."""
    rng = random.Random(f"{seed}/niah/{length}/{depth:g}/{index}")
    (key,) = keys(rng, 1)
    value = number(rng)
    needles = [(NEEDLE.format(key=key, value=value), depth)]
    prompt = fit(count, lambda n: (niah_prompt(n, needles, key),), length, length)[0]
    return Sample("niah_single", length, prompt, (value,), tuple(needles))


class NeedleHeatmap:
    """The ``task=niah`` config.

    Args:
        name: The task name in result rows.
        lengths: Prompt lengths in tokens (the heat-map's columns).
        depths: Needle depths in [0, 1] (its rows).
        trials: Needles per cell.
        batch_size: Prompts per forward.
        question_protected: Compress the context only and keep the question (kvpress's
            protocol); false compresses both.
        chat: Use the chat template.
        seed: Seeds keys and values.
        show_progress: Progress bar over batches.
    """

    def __init__(
        self,
        name: str = "niah",
        lengths: Sequence[int] = (1024, 2048),
        depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        trials: int = 2,
        batch_size: int = 2,
        question_protected: bool = True,
        chat: bool = False,
        seed: int = 0,
        show_progress: bool = True,
    ) -> None:
        self.name = name
        self.lengths = int_list("task.lengths", lengths, 64)
        self.depths = depth_list(depths)
        self.trials = positive_int("task.trials", trials)
        self.batch_size = positive_int("task.batch_size", batch_size)
        self.question_protected = flag("task.question_protected", question_protected)
        self.chat = bool(chat)
        self.seed = int(seed)
        self.show_progress = show_progress

    def make_trials(self, tokenizer: Any) -> list[Sample]:
        """Every prompt, in (length, depth, trial) order."""
        count = token_counter(tokenizer)
        return [
            make_trial(count, length, depth, self.seed, i)
            for length in self.lengths
            for depth in self.depths
            for i in range(self.trials)
        ]

    def check_context(self, context: int | None, cache_spec: Any = None) -> None:
        """Refuse lengths beyond the model's context (``llamahome.eval``: before loading)."""
        check_prompt_lengths(self.lengths, ["niah_single"], context)

    def run(self, model: Any, tokenizer: Any, cache_spec: Any) -> Outcome:
        """Answer every trial; accuracy overall, per length and per (length, depth) cell."""
        self.check_context(context_length(model.config), cache_spec)
        trials = self.make_trials(tokenizer)
        # Batches are grouped by (subtask, length): every cell of a length shares them.
        scores, tokens, meter, watch = score_samples(
            model,
            tokenizer,
            trials,
            cache_spec,
            self.batch_size,
            self.chat,
            self.question_protected,
            self.show_progress,
            self.name,
        )
        extras: dict[str, Any] = {
            "protocol": protocol_name(self.question_protected),
            "trials_per_cell": self.trials,
        }
        per = len(self.depths) * self.trials
        for li, length in enumerate(self.lengths):
            extras[f"accuracy@{length}"] = sum(scores[li * per : (li + 1) * per]) / per
            for di, depth in enumerate(self.depths):
                at = li * per + di * self.trials
                extras[f"accuracy@{length}_d{depth:g}"] = (
                    sum(scores[at : at + self.trials]) / self.trials
                )
        return Outcome.measured(
            "accuracy", sum(scores) / len(scores), meter, watch, tokens, extras
        )
