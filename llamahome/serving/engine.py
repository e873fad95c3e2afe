"""The generation engine: one thread owns the model and serves a bounded queue in batches.

Why our own loop rather than ``model.generate``: each row of a batch has its own sampling
(temperature, top_p, seed), its own stop strings and ``max_tokens``, and streams its own text;
a finished row leaves the batch (``cache.batch_select_indices``) so the others go faster.

Batching: the engine takes the oldest waiting request, waits ``batch_window_s`` for others,
and runs together up to ``max_batch_size`` requests that share a cache configuration (one
cache object holds one policy and one budget for all its rows), left-padded to the longest
prompt. Requests with another cache configuration wait for the next batch, oldest first.
The queue is bounded: ``submit`` raises :class:`QueueFull` rather than wait without end.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("llamahome.serve")

Event = tuple[str, Any]  # ("delta", text) | ("done", (finish_reason, usage parts)) | ("error", msg)


class QueueFull(Exception):
    """The request queue holds ``max_queue`` requests already."""


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
    """

    prompt_ids: list[int]
    max_tokens: int
    cache_spec: Any
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def cache_key(self) -> str:
        """Requests with equal keys may share one cache object (same policy and budget)."""
        return repr(self.cache_spec)


class _Row:
    """A request's decoding state inside a batch."""

    def __init__(self, req: GenRequest, tokenizer: Any) -> None:
        self.req = req
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.text = ""
        self.finish: str | None = None
        self.generator = torch.Generator().manual_seed(
            req.seed if req.seed is not None else random.getrandbits(63)
        )
        self.holdback = max((len(s) for s in req.stop), default=1) - 1

    def push(self, token: int, eos: set[int]) -> None:
        """Add a token; decide whether the row is finished; emit the new safe text."""
        if token in eos:
            self.ids.append(token)
            self.finish = "stop"
        else:
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = min((i for s in self.req.stop if (i := self.text.find(s)) >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
            elif len(self.ids) >= self.req.max_tokens:
                self.finish = "length"
        if self.req.cancelled.is_set():
            self.finish = self.finish or "cancelled"
        # Hold back what may still become a stop string or an incomplete UTF-8 character.
        end = len(self.text) if self.finish else len(self.text) - self.holdback
        while end > self.sent and self.text[end - 1] == "\ufffd" and not self.finish:
            end -= 1
        if end > self.sent:
            self.req.emit(("delta", self.text[self.sent : end]))
            self.sent = end


class Engine:
    """Owns the model on one thread; batches and runs queued :class:`GenRequest` objects."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        build_cache: Callable[[Any, int], Any],
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_window_s: float = 0.01,
    ) -> None:
        """Set up (the thread starts with :meth:`start`).

        Args:
            model: A causal LM in eval mode.
            tokenizer: Its tokenizer (pad token set).
            build_cache: ``(cache_spec, seq_len) -> Cache``.
            max_batch_size: Rows per batch at most (1 = one request at a time).
            max_queue: Requests waiting at most; more raise :class:`QueueFull`.
            batch_window_s: How long the engine waits for companions of a first request.
        """
        self.model, self.tokenizer, self.build_cache = model, tokenizer, build_cache
        self.max_batch_size, self.max_queue = max(1, max_batch_size), max(1, max_queue)
        self.batch_window_s = batch_window_s
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="llamahome-engine", daemon=True)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {t for t in [*eos, tokenizer.eos_token_id] if t is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        self.batches = 0  # batches run, their rows and tokens generated: for /health and tests
        self.rows = 0
        self.tokens = 0

    # ---- public ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end after its current batch, and wait for it."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, req: GenRequest) -> None:
        """Queue a request.

        Raises:
            QueueFull: When ``max_queue`` requests are already waiting.
        """
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (serve.max_queue)")
            self._waiting.append(req)
            self._cond.notify()

    @property
    def queued(self) -> int:
        """Requests waiting (not yet in a batch)."""
        return len(self._waiting)

    # ---- the thread --------------------------------------------------------------------------
    def _next_batch(self) -> list[GenRequest] | None:
        with self._cond:
            while not self._waiting and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
        if self.max_batch_size > 1 and len(self._waiting) < self.max_batch_size:
            time.sleep(self.batch_window_s)  # let requests sent together arrive together
        with self._cond:
            key = self._waiting[0].cache_key
            batch = [r for r in self._waiting if r.cache_key == key][: self.max_batch_size]
            for r in batch:
                self._waiting.remove(r)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [r for r in batch if not r.cancelled.is_set()]
            if not live:
                continue
            try:
                self._generate(live)
            except Exception as err:  # never let one bad batch end the server
                log.exception("generation failed for a batch of %d", len(live))
                for r in live:
                    r.emit(("error", f"generation failed: {type(err).__name__}: {err}"))

    # ---- one batch ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _generate(self, batch: list[GenRequest]) -> None:
        self.batches += 1
        self.rows += len(batch)
        rows = [_Row(r, self.tokenizer) for r in batch]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # One budget for the batch: the paper's L is the longest row's prompt + answer.
        cache = self.build_cache(batch[0].cache_spec, width + max(r.max_tokens for r in batch))
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
            use_cache=True, logits_to_keep=1,
        )
        active = list(range(len(rows)))  # row index of each batch position
        while True:
            tokens = self._sample(out.logits[:, -1, :], [rows[i] for i in active])
            self.tokens += len(active)
            for pos, i in enumerate(active):
                rows[i].push(int(tokens[pos]), self.eos)
            keep = [pos for pos, i in enumerate(active) if rows[i].finish is None]
            for i in active:
                if rows[i].finish is not None:
                    self._finish(rows[i], cache, len(active), width)
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, positions, tokens = mask[index], positions[index], tokens[index]
                active = [active[pos] for pos in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                cache=cache, use_cache=True,
            )

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """One token per row: greedy at temperature 0, else top-p sampling with its generator."""
        logits = logits.float()
        out = logits.argmax(dim=-1).cpu()
        for pos, row in enumerate(rows):
            if row.req.temperature <= 0:
                continue
            probs = torch.softmax(logits[pos].cpu() / row.req.temperature, dim=-1)
            if row.req.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                # Keep the smallest set whose mass reaches top_p (the first token always stays).
                drop = sorted_p.cumsum(-1) - sorted_p >= row.req.top_p
                sorted_p[drop] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            out[pos] = torch.multinomial(probs, 1, generator=row.generator)[0]
        return out.to(self.device)

    def _finish(self, row: _Row, cache: Any, batch_rows: int, width: int) -> None:
        """Emit the row's last event: finish reason and the usage figures."""
        from llamahome.kvcache.spec import kv_bytes

        # The last token is returned, never fed back: the cache has seen one fewer.
        tokens = len(row.req.prompt_ids) + len(row.ids) - 1
        per_token = _bytes_per_token(cache)
        full = per_token * tokens
        # The row's share of the batch's buffers, and never more than its own tokens: padding
        # to the longest prompt is a cost of batching, not of the policy.
        held = min(kv_bytes(cache) // max(1, batch_rows), full)
        row.req.emit(
            ("done", (row.finish, len(row.ids), getattr(cache, "policy", "full"), held, full))
        )


def _bytes_per_token(cache: Any) -> int:
    """Key + value bytes one token takes in a full cache, over all layers (one row)."""
    total = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.dim() == 4:
            _, heads, _, dim = keys.shape
            total += 2 * heads * dim * keys.element_size()
    return total


def build_cache(spec: Any, model_config: Any, seq_len: int) -> Any:
    """``spec.build`` with the sequence length the ratio budget refers to (prompt + answer)."""
    return spec.build(model_config, seq_len=seq_len)
