"""RULER-style synthetic prompts, generated offline and deterministic by seed (Hsieh et al., 2024).

The formats follow RULER's task definitions (``scripts/data/synthetic`` of NVIDIA/RULER),
written anew for this project: the same instructions, needle sentences, questions and answer
prefixes, on RULER's "noise" haystack (the passkey filler sentences). Each prompt is fitted to a
length in tokens *of the model's tokenizer* (the whole prompt: context + question + answer
prefix), and records where its needles went, so tests can check them.

* ``niah_single``: one "One of the special magic numbers for <key> is: <7 digits>." sentence.
* ``niah_multikey``: the queried needle among 3 distractor needles with other keys.
* ``niah_multivalue``: 4 values for the same key; all 4 must be recalled.
* ``niah_multiquery``: 4 keys asked at once; all 4 values must be recalled.
* ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops);
  recall every variable holding the value.
* ``cwe`` (common-words extraction): a numbered word list where 10 words occur ``freq_cw`` times
  and the others ``freq_ucw`` times; recall the 10 common ones.
* ``fwe`` (frequent-words extraction): coded words drawn with Zipf(alpha=2) counts; recall the 3
  most frequent.

Deviations, for short contexts: ``cwe`` lowers the common words' frequency from RULER's 30 until
the 10 common words fill at most half the list (at 1k tokens there is room for ~200 entries);
``vt`` uses one chain. Keys are ``adjective-noun`` pairs from ``words.py``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamahome.evaluation.passkey import FILLER
from llamahome.evaluation.protocol import Prompt
from llamahome.evaluation.words import ADJECTIVES, NOUNS

SUBTASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
# Tokens to generate per subtask: the answer with room for separators (RULER uses 128 / 30 / 120
# / 50; ours are shorter because decoding dominates a CPU run and answers here are short).
MAX_NEW_TOKENS = {
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "vt": 32,
    "cwe": 48,
    "fwe": 24,
}
NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the numbers afterwards.\n"
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = (
    "\nWhat are all the special magic numbers for {query} mentioned in the provided text? "
    "The special magic numbers for {query} mentioned in the provided text are"
)
VT_INTRO = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
)
VT_QUESTION = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {count} "
    "variables are assigned the value {value}, they are:"
)
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = (
    "\nQuestion: What are the {count} most common words in the above list? "
    "Answer: The top {count} words that appear most often in the list are:"
)
FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. "
)
FWE_QUESTION = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
    "three most frequently appeared words in the above coded text? Answer: According to the "
    "coded text above, the three most frequently appeared words are:"
)
SENTENCES = tuple(f"{s.strip()}." for s in FILLER.split(".") if s.strip())


@dataclass(frozen=True)
class Sample:
    """One generated prompt and its references.

    Attributes:
        subtask: One of :data:`SUBTASKS`.
        length: The target prompt length in tokens.
        prompt: Context and question (the question ends with the answer prefix).
        answers: Strings the answer must contain (string-match recall).
        needles: (sentence, depth) of each inserted needle, depth in [0, 1] of the haystack.
    """

    subtask: str
    length: int
    prompt: Prompt
    answers: tuple[str, ...]
    needles: tuple[tuple[str, float], ...] = field(default=())


def string_match_all(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """RULER's score: the share of `answers` found in `prediction` (case-insensitive)."""
    if not answers:
        return 0.0
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def token_counter(tokenizer: Any) -> Callable[[Prompt], int]:
    """Count the tokens of a whole prompt with the model's tokenizer (special tokens included)."""

    def count(prompt: Prompt) -> int:
        return len(tokenizer(prompt.context + prompt.question)["input_ids"])

    return count


def fit(count: Callable[[Prompt], int], build: Callable[[int], Any], length: int, hi: int) -> Any:
    """Return ``build(n)`` for the largest ``n`` in [0, hi] whose prompt fits in `length` tokens.

    ``build(n)`` returns a tuple whose first item is the Prompt; token counts grow with ``n``.
    """
    lo, best = 0, build(0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        made = build(mid)
        if count(made[0]) <= length:
            lo, best = mid, made
        else:
            hi = mid - 1
    return best


def haystack(n: int, needles: list[tuple[str, float]]) -> str:
    """`n` filler sentences with each needle sentence inserted at its depth (0 = first)."""
    filler = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
    slots: dict[int, list[str]] = {}
    for sentence, depth in needles:
        slots.setdefault(round(depth * n), []).append(sentence)
    parts: list[str] = []
    for i in range(n + 1):
        parts += slots.get(i, [])
        if i < n:
            parts.append(filler[i])
    return " ".join(parts)


def keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct ``adjective-noun`` keys."""
    out: list[str] = []
    while len(out) < count:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in out:
            out.append(key)
    return out


def number(rng: random.Random, digits: int = 7) -> str:
    """Draw a number with exactly `digits` digits."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def niah_prompt(n: int, needles: list[tuple[str, float]], query: str) -> Prompt:
    """Build the RULER needle prompt over `n` filler sentences."""
    return Prompt(NIAH_INTRO + haystack(n, needles) + "\n", NIAH_QUESTION.format(query=query))


def _niah(kind: str, rng: random.Random, count: Callable, length: int) -> Sample:
    many = 4
    if kind == "niah_single":
        (key,), values = keys(rng, 1), [number(rng)]
        needles = [(NEEDLE.format(key=key, value=values[0]), rng.random())]
        query, answers = key, values
    elif kind == "niah_multikey":
        names = keys(rng, many)
        values = [number(rng) for _ in names]
        needles = [
            (NEEDLE.format(key=k, value=v), rng.random())
            for k, v in zip(names, values, strict=True)
        ]
        query, answers = names[0], values[:1]
    elif kind == "niah_multivalue":
        (key,) = keys(rng, 1)
        values = [number(rng) for _ in range(many)]
        needles = [(NEEDLE.format(key=key, value=v), rng.random()) for v in values]
        query, answers = key, values
    else:  # niah_multiquery
        names = keys(rng, many)
        values = [number(rng) for _ in names]
        needles = [
            (NEEDLE.format(key=k, value=v), rng.random())
            for k, v in zip(names, values, strict=True)
        ]
        query, answers = ", ".join(names[:-1]) + ", and " + names[-1], values
    prompt = fit(count, lambda n: (niah_prompt(n, needles, query),), length, length)[0]
    return Sample(kind, length, prompt, tuple(answers), tuple(needles))


def _vt(rng: random.Random, count: Callable, length: int, hops: int = 4) -> Sample:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    depths = sorted(rng.random() for _ in chain)  # in order, so the chain reads forwards
    needles = list(zip(chain, depths, strict=True))
    question = VT_QUESTION.format(value=value, count=len(names))

    def build(n: int) -> tuple[Prompt]:
        return (Prompt(VT_INTRO + haystack(n, needles) + "\n", question),)

    return Sample("vt", length, fit(count, build, length, length)[0], tuple(names), tuple(needles))


def _cwe(
    rng: random.Random, count: Callable, length: int, freq_cw: int = 30, freq_ucw: int = 3
) -> Sample:
    pool = sorted(set(ADJECTIVES) | set(NOUNS))
    rng.shuffle(pool)
    common, rare = pool[:10], pool[10:]
    base = rng.random()
    question = CWE_QUESTION.format(count=len(common))

    def build(n: int, freq: int) -> tuple[Prompt, list[str]]:
        low = min(freq_ucw, freq - 1)
        words = [w for w in common for _ in range(freq)] + [w for w in rare[:n] for _ in range(low)]
        random.Random(f"{base}/{n}/{freq}").shuffle(words)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return Prompt(CWE_INTRO + listing + "\n", question), words

    freq = freq_cw
    # The common words fill at most half the list: lower their frequency for short prompts.
    while (
        freq > 2
        and count(build(len(common) * freq // max(1, min(freq_ucw, freq - 1)), freq)[0]) > length
    ):
        freq -= 1
    prompt, _ = fit(count, lambda n: build(n, freq), length, len(rare))
    return Sample("cwe", length, prompt, tuple(common))


def _fwe(rng: random.Random, count: Callable, length: int, alpha: float = 2.0) -> Sample:
    vocab: list[str] = []
    while len(vocab) < 2000:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        if word not in vocab:
            vocab.append(word)
    base, order = rng.random(), random.Random()

    def build(total: int) -> tuple[Prompt, list[str]]:
        total = max(total, 30)  # from 30 words on, the top 3 counts are distinct (18, 4, 2)
        counts, rank = [], 1
        top = 0.6 * total
        while sum(counts) < total:
            counts.append(max(1, min(int(top / rank**alpha), total - sum(counts))))
            rank += 1
        words = [vocab[r] for r, c in enumerate(counts) for _ in range(c)]
        order.seed(f"{base}/{total}")
        order.shuffle(words)
        text = " ".join(w if i % 5 else f"{w} ...." for i, w in enumerate(words, 1))
        return Prompt(FWE_INTRO + text + "\n", FWE_QUESTION), vocab[:3]

    prompt, answers = fit(count, build, length, length)
    return Sample("fwe", length, prompt, tuple(answers))


def make_sample(
    subtask: str, count: Callable[[Prompt], int], length: int, seed: int, index: int, **options: Any
) -> Sample:
    """Generate sample `index` of `subtask` at `length` tokens (deterministic in all arguments).

    Args:
        subtask: One of :data:`SUBTASKS`.
        count: Counts a prompt's tokens (``token_counter(tokenizer)``).
        length: Target prompt length in tokens.
        seed: The task seed.
        index: The sample's index in its (subtask, length) cell.
        **options: ``freq_cw``/``freq_ucw`` (cwe), ``hops`` (vt).

    Returns:
        The sample.
    """
    rng = random.Random(f"{seed}/{subtask}/{length}/{index}")
    if subtask.startswith("niah_"):
        return _niah(subtask, rng, count, length)
    if subtask == "vt":
        return _vt(rng, count, length, **{k: v for k, v in options.items() if k == "hops"})
    if subtask == "cwe":
        cwe = {k: v for k, v in options.items() if k in ("freq_cw", "freq_ucw")}
        return _cwe(rng, count, length, **cwe)
    if subtask == "fwe":
        return _fwe(rng, count, length)
    raise ValueError(f"unknown subtask {subtask!r}")
