"""Streaming perplexity: teacher-forced perplexity with the cache evicting as it does in generation.

A plain forward pass scores every token against every earlier token; a KV-cache policy only
matters once tokens are evicted, which happens during decoding. So the text is fed the way
generation feeds it: prefill ``prefix`` tokens (evicted down to the budget right after), then
the rest one token at a time through the same cache; perplexity is taken over the tokens after
the prefix. With the full cache this equals the plain forward pass's perplexity on those tokens
(``plain_perplexity``, tested to 1e-4), which is what makes the other policies' numbers
comparable.

The default text is the running interpreter's ``pydoc_data.topics`` (the Python reference
manual that every CPython carries), topics joined in sorted order: English prose, offline and
deterministic for a given Python version. ``text_file=`` evaluates a user file instead.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llamahome.errors import ConfigError, DataError
from llamahome.evaluation.base import KVMeter, Outcome, Stopwatch, positive_int, progress
from llamahome.model.context import check_length, context_length

log = logging.getLogger(__name__)

# Characters of text tokenized per token needed: English prose is ~4 characters per token, so
# 8 leaves room for code-heavy text without tokenizing the whole 1 MB manual.
_CHARS_PER_TOKEN = 8


def default_text() -> str:
    """Return the Python reference manual (``pydoc_data.topics``), topics in sorted name order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def read_text_file(path: str | Path) -> str:
    """Read a user's text file (UTF-8).

    Raises:
        DataError: The file is missing, unreadable, not UTF-8 or empty (names the file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"task.text_file={str(path)!r} does not exist (or is not a file).")
    from llamahome.data import read_text

    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; give some text to score.")
    return text


def token_segments(
    tokenizer: Any, text: str, length: int, segments: int, source: str = "text"
) -> torch.Tensor:
    """Cut the start of `text` into `segments` consecutive rows of `length` tokens.

    Each row starts with the tokens the tokenizer puts before any text (a BOS, or nothing), as
    a document would. A text shorter than ``segments * length`` tokens gives fewer or shorter
    rows (logged), never padding.

    Args:
        tokenizer: The model's tokenizer.
        text: The text.
        length: Tokens per row (the special prefix included).
        segments: Rows wanted.
        source: The text's name for messages (a file path or "pydoc_data.topics").

    Returns:
        A (rows, tokens) LongTensor.

    Raises:
        DataError: Fewer than 2 tokens of text (nothing to predict).
    """
    special = tokenizer("", add_special_tokens=True)["input_ids"]
    body_len = length - len(special)
    need = body_len * segments
    ids = tokenizer(text[: need * _CHARS_PER_TOKEN], add_special_tokens=False)["input_ids"]
    if len(ids) < need and len(text) > need * _CHARS_PER_TOKEN:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise DataError(f"{source}: has {len(ids)} token(s); perplexity needs at least 2.")
    rows = min(segments, len(ids) // body_len) or 1
    body_len = min(body_len, len(ids) // rows)
    if rows < segments or body_len + len(special) < length:
        log.warning(
            "%s: %d tokens, fewer than task.segments=%d x task.length=%d: scoring %d x %d",
            source,
            len(ids),
            segments,
            length,
            rows,
            body_len + len(special),
        )
    out = [special + ids[r * body_len : (r + 1) * body_len] for r in range(rows)]
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def plain_perplexity(model: Any, input_ids: torch.Tensor, prefix: int) -> float:
    """Teacher-forced perplexity of tokens ``prefix..`` from one plain forward pass (no cache).

    The reference that ``streaming_perplexity`` with the full cache must reproduce.

    Args:
        model: The causal LM.
        input_ids: (rows, tokens).
        prefix: Tokens before the scored part.

    Returns:
        exp(mean negative log-likelihood) over ``rows * (tokens - prefix)`` predictions.
    """
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    logits = model(input_ids=ids, use_cache=False).logits[:, prefix - 1 : -1].double()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, prefix:].reshape(-1))
    return math.exp(float(nll))


@torch.no_grad()
def streaming_perplexity(
    model: Any, input_ids: torch.Tensor, cache_spec: Any, prefix: int, show_progress: bool = False
) -> Outcome:
    """Prefill `prefix` tokens, decode the rest one by one through the cache; score the rest.

    Args:
        model: The causal LM (hybrid attention for evicting policies: ``load_model`` does it).
        input_ids: (rows, tokens); rows are scored independently, in one batch.
        cache_spec: A ``CacheSpec`` (``spec.build(model.config)`` makes the cache).
        prefix: Tokens prefilled at once (>= 1, < tokens).
        show_progress: Show a progress bar over the decoded tokens.

    Returns:
        ``ppl`` (lower is better) with ``nll``, ``prefix`` and ``scored`` as extras, the KV bytes
        at the end, and whether anything was evicted.

    Raises:
        ConfigError: `prefix` leaves nothing to score.
    """
    from llamahome.model.generation import cache_kwarg

    rows, total = input_ids.shape
    if not 1 <= prefix < total:
        raise ConfigError(
            f"task.prefix={prefix} must be >= 1 and below the {total} tokens scored "
            "(lower task.prefix or raise task.length)."
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    # Ratio budgets are shares of the scored length (the H2O paper's sequence length).
    cache = cache_spec.build(model.config, seq_len=total)
    kw = {cache_kwarg(): cache, "use_cache": True}
    watch = Stopwatch()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with watch:
            # Only the last position's logits are needed after the prefill.
            out = model(input_ids=ids[:, :prefix], logits_to_keep=1, **kw)
            nll += _nll(out.logits[:, -1], ids[:, prefix])
            steps = progress(
                range(prefix, total - 1), total - 1 - prefix, "streaming ppl", show_progress
            )
            for t in steps:
                out = model(input_ids=ids[:, t : t + 1], **kw)
                nll += _nll(out.logits[:, -1], ids[:, t + 1])
    finally:
        model.train(was_training)
    scored = rows * (total - prefix)
    mean = float(nll) / scored
    meter = KVMeter()
    meter.add(cache)
    return Outcome(
        metric="ppl",
        value=math.exp(mean),
        higher_is_better=False,
        extras={"nll": mean, "prefix": prefix, "scored": scored, "rows": rows, "length": total},
        kv_bytes=meter.kv_bytes,
        full_kv_bytes=meter.full_kv_bytes,
        tokens=rows * total,
        seconds=watch.seconds,
        evicted=meter.evicted,
        keep_ratio=meter.keep_ratio,
    )


def positions_seen(length: int, prefix: int, cache_spec: Any) -> int:
    """How many positions the model sees scoring ``length`` tokens through ``cache_spec``.

    ``length``, unless position rolling re-rotates the kept keys to their slot rank: then the
    prefill (``prefix`` tokens at once) or the budget's slots plus the token being fed.
    """
    budget = getattr(cache_spec, "budget", None)
    if not getattr(cache_spec, "position_rolling", False) or budget is None:
        return length
    return min(length, max(prefix, budget.for_cache(length).total(length) + 1))


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.double(), target, reduction="sum")


class StreamingPerplexity:
    """The ``task=streaming_ppl`` config: what text, how long, how much prefill.

    Validated on construction, so a bad value or a missing file fails before the model loads.

    Args:
        name: The task name in result rows.
        text_file: A UTF-8 text file; ``None`` for the Python reference manual.
        length: Tokens per row (prefix + decoded).
        prefix: Tokens prefilled at once before decoding token by token.
        segments: Consecutive rows of the text scored as one batch (more text, same time per
            step on most hardware).
        show_progress: Progress bar over the decoded tokens.

    Raises:
        ConfigError: A value out of range (names ``task.<key>``).
        DataError: ``text_file`` is missing or empty.
    """

    def __init__(
        self,
        name: str = "streaming_ppl",
        text_file: str | None = None,
        length: int = 1280,
        prefix: int = 256,
        segments: int = 1,
        show_progress: bool = True,
    ) -> None:
        self.name = name
        self.length = positive_int("task.length", length, 2)
        self.prefix = positive_int("task.prefix", prefix, 1)
        self.segments = positive_int("task.segments", segments, 1)
        if self.prefix >= self.length:
            raise ConfigError(
                f"task.prefix={prefix} must be below task.length={length}: the tokens after "
                "the prefix are the ones scored."
            )
        self.text_file = text_file
        self.show_progress = show_progress
        self._text = read_text_file(text_file) if text_file else None

    @property
    def source(self) -> str:
        """Where the text comes from, for rows and messages."""
        return str(self.text_file) if self.text_file else "pydoc_data.topics"

    def input_ids(self, tokenizer: Any) -> torch.Tensor:
        """Return the (rows, tokens) ids this task scores."""
        text = self._text if self._text is not None else default_text()
        return token_segments(tokenizer, text, self.length, self.segments, self.source)

    def check_context(self, context: int | None, cache_spec: Any = None) -> None:
        """Refuse ``task.length`` beyond the model's context (``llamahome.eval``: before loading).

        With ``cache.position_rolling`` the model sees positions up to the cache's budget only
        (kept keys are re-rotated to their slot rank), so a text longer than the context can be
        scored as StreamingLLM does; the prefill and the budget are what must fit then.
        """
        positions = positions_seen(self.length, self.prefix, cache_spec)
        rolled = " (the cache budget, positions rolled)" if positions < self.length else ""
        check_length(
            f"task.length={self.length}{rolled}", positions, context,
            hint=f"lower task.length to at most {context}, or (cache=window, sink or h2o) set "
            "cache.position_rolling=true with a budget and task.prefix within the context",
        )

    def run(self, model: Any, tokenizer: Any, cache_spec: Any) -> Outcome:
        """Score the text with a fresh cache of `cache_spec`."""
        self.check_context(context_length(model.config), cache_spec)
        ids = self.input_ids(tokenizer)
        prefix = min(self.prefix, ids.shape[1] - 1)
        outcome = streaming_perplexity(model, ids, cache_spec, prefix, self.show_progress)
        outcome.extras["text"] = self.source
        return outcome
