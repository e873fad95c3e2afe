"""Passkey retrieval: a number hidden at a chosen depth of filler text, asked for at the end.

The synthetic test of Mohtashami & Jaggi (2023, "Landmark Attention") that long-context and
KV-cache papers report: the prompt is an instruction, repeated filler sentences with one
"The pass key is 71432" line at ``depth`` (0 = start, 1 = end), and the question
"What is the pass key? The pass key is" last. A trial is correct when the first number the model
generates (greedy) is the key. Each (length, depth) gets ``trials`` keys drawn from a seeded RNG,
the same keys for every policy, so policies are compared on identical prompts.

With eviction at prefill a cache can only answer if it kept the key's tokens: the first digit is
predicted from the prefill (full attention), the following digits from the kept slots.

``question_protected`` (default true, kvpress's protocol) prefills the instruction and filler
through the cache and then feeds the question inside ``pinned(cache)``; false prefills the whole
prompt at once (see ``protocol.py``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llamahome.errors import ConfigError
from llamahome.evaluation.base import (
    KVMeter,
    Outcome,
    Stopwatch,
    depth_list,
    flag,
    int_list,
    positive_int,
    progress,
)
from llamahome.evaluation.protocol import answer, protocol_name, split_prompt
from llamahome.model.context import check_length, context_length

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Trial:
    """One passkey prompt."""

    length: int
    depth: float
    key: str
    prompt: str


def build_prompt(tokenizer: Any, length: int, depth: float, key: str) -> str:
    """Build a prompt of about `length` tokens with the key's sentence at `depth` of the filler.

    Args:
        tokenizer: Counts tokens.
        length: Target prompt length in tokens (the prompt is at least instruction + key +
            question long).
        depth: Where the key goes among the filler sentences, 0 (first) to 1 (last).
        key: The pass key (digits).

    Returns:
        The prompt text.
    """

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])

    # The filler is counted in sentences (the paragraph's five, cycled): depth resolution is
    # one sentence, not one paragraph.
    sentences = [f"{s.strip()}." for s in FILLER.split(".") if s.strip()]

    def assemble(n: int) -> str:
        filler = [sentences[i % len(sentences)] for i in range(n)]
        before = round(depth * n)
        return " ".join([INTRO, *filler[:before], needle, *filler[before:], QUESTION])

    needle = NEEDLE.format(key=key)
    sample = 8 * len(sentences)
    per_sentence = max(1.0, (count(" ".join(sentences * 8)) - count("")) / sample)
    n = max(0, round((length - count(assemble(0))) / per_sentence))
    # One correction: merges across sentence joins make the estimate drift on some tokenizers.
    n = max(0, n + round((length - count(assemble(n))) / per_sentence))
    return assemble(n)


def make_trials(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    digits: int,
    seed: int,
) -> list[Trial]:
    """All prompts: `trials` random keys for every (length, depth), seeded."""
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1), 10**digits - 1
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randint(low, high))
                out.append(Trial(length, depth, key, build_prompt(tokenizer, length, depth, key)))
    return out


def is_correct(answer: str, key: str) -> bool:
    """Whether the first number in `answer` is `key`."""
    match = _NUMBER.search(answer)
    return match is not None and match.group() == key


class Passkey:
    """The ``task=passkey`` config: lengths, depths, trials per (length, depth).

    Args:
        name: The task name in result rows.
        lengths: Prompt lengths in tokens.
        depths: Key positions in [0, 1] (0 = right after the instruction, 1 = just before the
            question).
        trials: Keys per (length, depth); real runs use >= 50 (tests fewer).
        digits: Digits per key.
        batch_size: Prompts per generate() call (same length, so little padding).
        chat: Use the chat template (off: the prompt ends with "The pass key is", a completion).
        question_protected: Compress the filler only and keep the question (kvpress's protocol);
            false compresses the whole prompt.
        seed: Seeds the keys.
        show_progress: Progress bar over batches.

    Raises:
        ConfigError: A value out of range (names ``task.<key>``).
    """

    def __init__(
        self,
        name: str = "passkey",
        lengths: Sequence[int] = (512, 1024),
        depths: Sequence[float] = (0.1, 0.5, 0.9),
        trials: int = 50,
        digits: int = 5,
        batch_size: int = 10,
        chat: bool = False,
        question_protected: bool = True,
        seed: int = 0,
        show_progress: bool = True,
    ) -> None:
        self.name = name
        self.lengths = int_list("task.lengths", lengths, 16)
        self.depths = depth_list(depths)
        self.trials = positive_int("task.trials", trials)
        self.digits = positive_int("task.digits", digits)
        if self.digits > 18:
            raise ConfigError(f"task.digits={digits} must be <= 18.")
        self.batch_size = positive_int("task.batch_size", batch_size)
        self.chat = bool(chat)
        self.question_protected = flag("task.question_protected", question_protected)
        self.seed = int(seed)
        self.show_progress = show_progress

    @property
    def max_new_tokens(self) -> int:
        """Answer tokens: digits may be one token each (Llama, SmolLM2), plus a space and a dot."""
        return self.digits + 3

    def check_context(self, context: int | None, cache_spec: Any = None) -> None:
        """Refuse lengths beyond the model's context (``llamahome.eval``: before loading)."""
        shown = ", ".join(map(str, self.lengths))
        check_length(f"task.lengths=[{shown}]", max(self.lengths), context, self.max_new_tokens)

    def run(self, model: Any, tokenizer: Any, cache_spec: Any) -> Outcome:
        """Answer every trial with a fresh cache per batch; accuracy overall and per cell."""
        context = context_length(model.config)
        self.check_context(context, cache_spec)  # before building 100k-token prompts
        trials = make_trials(
            tokenizer, self.lengths, self.depths, self.trials, self.digits, self.seed
        )
        # The prompts are fitted to about each length: check what they really are.
        longest = max(trials, key=lambda t: len(t.prompt))
        check_length(
            f"task.lengths=[{longest.length}] (the prompt built for it)",
            len(tokenizer(longest.prompt)["input_ids"]), context, self.max_new_tokens,
        )
        max_new = self.max_new_tokens
        meter, watch = KVMeter(), Stopwatch()
        correct: dict[tuple[int, float], int] = {}
        tokens = 0
        batches = [trials[i : i + self.batch_size] for i in range(0, len(trials), self.batch_size)]
        for batch in progress(batches, len(batches), "passkey", self.show_progress):
            with watch:
                answers, used = answer(
                    model,
                    tokenizer,
                    [split_prompt(t.prompt, QUESTION) for t in batch],
                    cache_spec,
                    max_new,
                    self.chat,
                    self.question_protected,
                    meter,
                )
            tokens += used
            for trial, reply in zip(batch, answers, strict=True):
                cell = (trial.length, trial.depth)
                correct[cell] = correct.get(cell, 0) + int(is_correct(reply, trial.key))
        extras: dict[str, Any] = {
            "protocol": protocol_name(self.question_protected),
            "trials_per_cell": self.trials,
        }
        for length in self.lengths:
            hits = sum(correct.get((length, d), 0) for d in self.depths)
            extras[f"accuracy@{length}"] = hits / (self.trials * len(self.depths))
            for depth in self.depths:
                extras[f"accuracy@{length}_d{depth:g}"] = (
                    correct.get((length, depth), 0) / self.trials
                )
        return Outcome.measured(
            "accuracy", sum(correct.values()) / len(trials), meter, watch, tokens, extras
        )
