"""One request inside the engine: its prompt, its own cache, its sampling and its streamed text.

Why our own loop rather than ``model.generate``: each row has its own sampling (temperature,
top_p, seed), stop strings, ``max_tokens`` and cache, joins and leaves the batch at any step,
and streams its own text.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Event = tuple[str, Any]  # ("delta", text) | ("done", Finished) | ("error", message)
_IDS = itertools.count()


@dataclass
class GenRequest:
    """One prompt to continue, as the engine sees it.

    Attributes:
        prompt_ids: The prompt's token ids.
        max_tokens: Tokens to generate at most.
        cache_spec: The request's cache policy and budget (a ``CacheSpec``).
        emit: Thread-safe callback that receives this request's events.
        temperature: 0 means greedy.
        top_p: Nucleus sampling mass.
        stop: Stop strings (the text is cut before the first one).
        seed: Seed of this request's own random generator (reproducible sampling).
        ignore_eos: Generate ``max_tokens`` tokens whatever the model's end-of-sequence token.
        kv_bytes: The KV bytes this request may come to hold (reserved at admission).
        cancelled: Set when the client is gone: the engine drops the request at its next step.
        arrival: ``time.perf_counter()`` at submission (latency metrics).
    """

    prompt_ids: list[int]
    max_tokens: int
    cache_spec: Any
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    kv_bytes: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.perf_counter)
    id: int = field(default_factory=lambda: next(_IDS))


@dataclass
class Finished:
    """A request's last event: why it ended and its usage figures."""

    reason: str  # stop | length
    completion_tokens: int
    kv_cache: dict[str, Any]


class Row:
    """A request's decoding state: its cache, tokens, text and what it has streamed."""

    def __init__(self, req: GenRequest, tokenizer: Any, cache: Any) -> None:
        """Start the row (its generator seeded from the request)."""
        self.req = req
        self.tokenizer = tokenizer
        self.cache = cache
        self.fed = 0  # tokens written to the cache (prompt, then all but the last sampled)
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.text = ""
        self.finish: str | None = None
        self.generator = torch.Generator().manual_seed(
            req.seed if req.seed is not None else random.getrandbits(63)
        )
        self.holdback = max((len(s) for s in req.stop), default=1) - 1
        self.admitted = time.perf_counter()
        self.last_token_at: float | None = None
        self.passed_over = 0  # prefill turns given to other rows since this one's last

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet prefilled."""
        return max(0, len(self.req.prompt_ids) - self.fed)

    def push(self, token: int, eos: set[int]) -> None:
        """Add a token; decide whether the row is finished; emit the new safe text."""
        self.ids.append(token)
        if token in eos and not self.req.ignore_eos:
            self.finish = "stop"
        else:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = min((i for s in self.req.stop if (i := self.text.find(s)) >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
            elif len(self.ids) >= self.req.max_tokens:
                self.finish = "length"
        # Hold back what may still become a stop string or an incomplete UTF-8 character.
        end = len(self.text) if self.finish else len(self.text) - self.holdback
        while end > self.sent and self.text[end - 1] == "\ufffd" and not self.finish:
            end -= 1
        if end > self.sent:
            self.req.emit(("delta", self.text[self.sent : end]))
            self.sent = end


def sample(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """One token per row: greedy at temperature 0, else top-p sampling with the row's generator.

    Args:
        logits: (rows, vocab), the last position of each row.
        rows: The rows, in the same order.

    Returns:
        The tokens, one per row.
    """
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()
    for pos, row in enumerate(rows):
        if row.req.temperature <= 0:
            continue
        # Shift before scaling, in float64: any temperature > 0, however small (5e-324, which
        # float32 rounds to 0), gives the best logit 0 and the others <= 0 (-inf at worst),
        # never 0 / 0 or inf - inf = NaN.
        row_logits = logits[pos].cpu().double()
        probs = torch.softmax((row_logits - row_logits.max()) / row.req.temperature, dim=-1)
        if row.req.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest set whose mass reaches top_p; the first token always stays (a
            # top_p too small for float32, such as 1e-320, compares as 0).
            drop = sorted_p.cumsum(-1) - sorted_p >= row.req.top_p
            drop[0] = False
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        out[pos] = int(torch.multinomial(probs, 1, generator=row.generator)[0])
    return out
