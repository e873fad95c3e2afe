"""The engine: one thread owns the model and runs continuous batching over per-request caches.

Every iteration of the engine thread::

    drop the requests whose client left
    admit waiting requests (oldest first) while their worst-case KV fits the pool
    prefill ONE chunk (serve.prefill_chunk tokens) of one admitted prompt, on its own cache
    decode ONE token for every running row, in one forward (kvcache.rows.RowsCache)
    rows that finished leave; a prompt whose last chunk ran joins the decode batch

So a request never waits for a batch to drain, and a long prompt delays the running streams by
one chunk per token at most. Each request has its own cache (its own policy and budget, sized
for its own prompt + ``max_tokens``) and evicts on its own; the decode forward serves all rows.
Which prompt gets the chunk: the one with the fewest prompt tokens left (a short question is
not stuck behind a long document), unless the oldest has been passed over ``MAX_PASSED_OVER``
times in a row.

Admission is by KV memory (``memory.KVPool``): a request waits until its worst case fits what
the running requests have not reserved; only a full wait queue (``max_queue``) refuses one
(:class:`QueueFull`, a 429). A failure in one row (its cache, its sampling) ends that row only.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from llamahome.kvcache.attention import enable_hybrid_attention
from llamahome.kvcache.rows import RowsCache
from llamahome.kvcache.score_spec import prefills_whole
from llamahome.kvcache.spec import keep_ratio, kv_bytes
from llamahome.serving.decoding import Finished, GenRequest, Row, sample
from llamahome.serving.memory import DEFAULT_SHARE, KVPool, free_memory, kv_bytes_per_token
from llamahome.serving.metrics import ServeMetrics

log = logging.getLogger("llamahome.serve")

MAX_PASSED_OVER = 4  # prefill turns the oldest prompt may lose to shorter ones in a row
_SLOW_STATS_S = 0.5  # keep ratios are read at most this often (they touch every layer)

__all__ = ["Engine", "GenRequest", "QueueFull"]


class QueueFull(Exception):
    """The wait queue holds ``max_queue`` requests already."""


class Engine:
    """Owns the model on one thread; admits, prefills and decodes queued :class:`GenRequest`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        build_cache: Callable[[Any, int], Any],
        max_batch_size: int = 32,
        max_queue: int = 64,
        kv_memory: int | None = None,
        prefill_chunk: int = 64,
        metrics: ServeMetrics | None = None,
    ) -> None:
        """Set up (the thread starts with :meth:`start`).

        Args:
            model: A causal LM in eval mode (switched to the hybrid attention).
            tokenizer: Its tokenizer.
            build_cache: ``(cache_spec, seq_len) -> Cache``, one per request.
            max_batch_size: Requests admitted at once at most (prefilling or decoding).
            max_queue: Requests waiting at most; one more raises :class:`QueueFull`.
            kv_memory: The KV pool in bytes; None = half the memory free now.
            prefill_chunk: Prompt tokens per prefill forward.
            metrics: Where to record (a fresh :class:`ServeMetrics` by default).
        """
        self.model, self.tokenizer, self.build_cache = model, tokenizer, build_cache
        enable_hybrid_attention(model)  # each row of a decode step attends on its own cache
        self.max_batch_size, self.max_queue = max(1, max_batch_size), max(1, max_queue)
        self.prefill_chunk = max(1, prefill_chunk)
        param = next(model.parameters())
        self.device = param.device
        per_token = kv_bytes_per_token(model.config, param.dtype)
        pool = kv_memory if kv_memory is not None else int(DEFAULT_SHARE * free_memory(self.device))
        self.pool = KVPool(pool, per_token, self.prefill_chunk)
        self.metrics = metrics or ServeMetrics()
        self.metrics.kv_pool.set(self.pool.pool)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {t for t in [*eos, tokenizer.eos_token_id] if t is not None}
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._prefilling: list[Row] = []
        self._running: list[Row] = []
        self._cond = threading.Condition()
        self._stop = self._held = False
        self._thread = threading.Thread(target=self._run, name="llamahome-engine", daemon=True)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._slow_at = 0.0
        self._keep = 1.0
        self.requests = 0  # requests answered, tokens generated, rows of the widest decode step
        self.tokens = 0
        self.peak_decode_rows = 0
        self.peak_bytes_held = 0
        self.stats: dict[str, Any] = self._snapshot(0)

    # ---- public ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def stop(self) -> None:
        """End the thread after its current step; requests still in flight get an error."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for req in [*self._waiting, *(r.req for r in self._prefilling + self._running)]:
            with contextlib.suppress(RuntimeError):  # its event loop may be closed already
                req.emit(("error", "the server is shutting down"))

    def submit(self, req: GenRequest) -> None:
        """Queue a request (``req.kv_bytes`` set to its worst case).

        Raises:
            QueueFull: When ``max_queue`` requests are already waiting.
        """
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (serve.max_queue)")
            self._waiting.append(req)
            self._cond.notify()

    def worst_case(self, spec: Any, prompt_tokens: int, max_tokens: int) -> int:
        """KV bytes a request may come to hold (what admission reserves)."""
        return self.pool.worst_case(spec, prompt_tokens, max_tokens)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Admit nothing inside the block (requests queue up; running ones go on)."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify()

    @property
    def queued(self) -> int:
        """Requests waiting (not yet admitted)."""
        return len(self._waiting)

    # ---- the thread --------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._prefilling or self._running or (self._waiting and not self._held))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._has_work():
                    self._cond.wait()
                if self._stop:
                    return
            try:
                busy = self._step()
            except Exception as err:  # never let one bad step end the server
                log.exception("engine step failed")
                for row in self._prefilling + self._running:
                    self._fail(row, err)
                self._prefilling, self._running, busy = [], [], True
            if not busy:
                with self._cond:  # waiting requests that do not fit yet: no busy loop
                    self._cond.wait(timeout=0.05)

    @torch.inference_mode()
    def _step(self) -> bool:
        self._drop_cancelled()
        self._admit()
        busy = bool(self._prefilling or self._running)
        if self._prefilling:
            self._prefill(self._pick_prefill())
        if self._running:
            self._decode()
        self._publish()
        return busy

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self._waiting if r.cancelled.is_set()]
            for req in gone:
                self._waiting.remove(req)
        for rows in (self._prefilling, self._running):
            for row in [r for r in rows if r.req.cancelled.is_set()]:
                rows.remove(row)
                self.pool.release(row.req.kv_bytes)

    def _admit(self) -> None:
        admitted = []
        with self._cond:
            while (
                self._waiting
                and not self._held
                and len(self._prefilling) + len(self._running) + len(admitted)
                < self.max_batch_size
                and self.pool.fits(self._waiting[0].kv_bytes)
            ):
                req = self._waiting.popleft()
                self.pool.reserve(req.kv_bytes)
                admitted.append(req)
        now = time.perf_counter()
        for req in admitted:
            self.metrics.queue_time.observe(now - req.arrival)
            try:
                seq_len = len(req.prompt_ids) + req.max_tokens
                row = Row(req, self.tokenizer, self.build_cache(req.cache_spec, seq_len))
            except Exception as err:  # one request's cache or seed: that request only
                self.pool.release(req.kv_bytes)
                log.exception("could not start request %d", req.id)
                req.emit(("error", f"generation failed: {type(err).__name__}: {err}"))
                continue
            self._prefilling.append(row)

    def _pick_prefill(self) -> Row:
        oldest = self._prefilling[0]
        if oldest.passed_over >= MAX_PASSED_OVER:
            row = oldest
        else:
            row = min(self._prefilling, key=lambda r: (r.prompt_left, r.req.id))
        if row is oldest:
            oldest.passed_over = 0
        else:
            oldest.passed_over += 1
        return row

    def _prefill(self, row: Row) -> None:
        """Run one chunk of `row`'s prompt on its own cache; it joins the decode batch when done."""
        # kvzip and global head budgets score a prompt as a whole: one forward for all of it.
        whole = prefills_whole(row.req.cache_spec)
        chunk = len(row.req.prompt_ids) if whole else self.prefill_chunk
        ids = row.req.prompt_ids[row.fed : row.fed + chunk]
        positions = torch.arange(row.fed, row.fed + len(ids), device=self.device)[None]
        try:
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device), position_ids=positions,
                cache=row.cache, use_cache=True, logits_to_keep=1,
            )
            row.fed += len(ids)
            self.metrics.prompt_tokens.inc(len(ids))
            if row.prompt_left:
                return
            self._prefilling.remove(row)
            token = sample(out.logits[:, -1, :], [row])[0]
        except Exception as err:  # this row's prompt or cache: this row only
            if row in self._prefilling:
                self._prefilling.remove(row)
            self._fail(row, err)
            return
        if self._push(row, token, time.perf_counter()):
            self._running.append(row)

    def _decode(self) -> None:
        """One token for every running row, in one forward over their own caches."""
        rows = list(self._running)
        self.peak_decode_rows = max(self.peak_decode_rows, len(rows))
        ids = torch.tensor([[r.ids[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[r.fed] for r in rows], device=self.device)
        # One row decodes on its own cache, as it would alone; several share one forward.
        cache = rows[0].cache if len(rows) == 1 else RowsCache([r.cache for r in rows],
                                                               self.model.config)
        try:
            out = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
            logits = out.logits[:, -1, :]
        except Exception as err:  # the shared forward itself: every row in it
            log.exception("a decode step of %d rows failed", len(rows))
            for row in rows:
                self._fail(row, err, logged=True)
            self._running = []
            return
        now = time.perf_counter()
        self._running = []
        for i, row in enumerate(rows):
            row.fed += 1
            failure = getattr(cache, "failures", {}).get(i)
            if failure is not None:
                self._fail(row, failure)
                continue
            try:
                token = sample(logits[i : i + 1], [row])[0]
            except Exception as err:  # noqa: BLE001 - this row's sampling: this row only
                self._fail(row, err)
                continue
            if self._push(row, token, now):
                self._running.append(row)

    def _push(self, row: Row, token: int, now: float) -> bool:
        """Add `row`'s new token; end the row when finished. Returns whether it goes on."""
        try:
            row.push(token, self.eos)
        except Exception as err:  # noqa: BLE001 - decoding this row's text: this row only
            self._fail(row, err)
            return False
        if row.last_token_at is None:
            self.metrics.ttft.observe(now - row.req.arrival)
        else:
            self.metrics.inter_token.observe(now - row.last_token_at)
        row.last_token_at = now
        self.tokens += 1
        self.metrics.generation_tokens.inc()
        self._recent.append((now, 1))
        if row.req.cancelled.is_set():
            self.pool.release(row.req.kv_bytes)
            return False
        if row.finish is None:
            return True
        self._finish(row, now)
        return False

    def _finish(self, row: Row, now: float) -> None:
        """Emit the row's last event (finish reason and usage) and free its reservation."""
        keep = keep_ratio(row.cache)
        kv = {
            "policy": getattr(row.cache, "policy", "full"),
            "bytes_held": kv_bytes(row.cache),
            # The last token is returned, never fed back: the cache has seen `fed` tokens.
            "bytes_full": self.pool.bytes_per_token * row.fed,
            "keep_ratio": round(keep, 4),
            "bytes_reserved": row.req.kv_bytes,
            "bytes_pool": self.pool.pool,
        }
        self.pool.release(row.req.kv_bytes)
        self.requests += 1
        self.metrics.evicted_tokens.inc(round(row.fed * (1.0 - keep)))
        self.metrics.success.labels(finished_reason=row.finish).inc()
        self.metrics.e2e.observe(now - row.req.arrival)
        row.req.emit(("done", Finished(row.finish or "stop", len(row.ids), kv)))

    def _fail(self, row: Row, err: BaseException, logged: bool = False) -> None:
        """End `row` with a server error (its reservation freed); the others go on."""
        self.pool.release(row.req.kv_bytes)
        if not logged:
            log.error("generation failed for request %d", row.req.id, exc_info=err)
        row.req.emit(("error", f"generation failed: {type(err).__name__}: {err}"))

    # ---- figures -----------------------------------------------------------------------------
    def _publish(self) -> None:
        now = time.perf_counter()
        rows = self._prefilling + self._running
        held = sum(kv_bytes(r.cache) for r in rows)
        self.peak_bytes_held = max(self.peak_bytes_held, held)
        if now - self._slow_at >= _SLOW_STATS_S:
            self._slow_at = now
            seen = sum(r.fed for r in rows)
            self._keep = sum(keep_ratio(r.cache) * r.fed for r in rows) / seen if seen else 1.0
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            span = min(10.0, now - self._recent[0][0]) if self._recent else 0.0
            rate = sum(n for _, n in self._recent) / span if span > 0 else 0.0
            self.metrics.tokens_per_second.set(rate)
            self.metrics.keep_ratio.set(self._keep)
        self.stats = self._snapshot(held)
        m = self.metrics
        m.running.set(len(rows))
        m.waiting.set(len(self._waiting))
        m.kv_held.set(held)
        m.kv_reserved.set(self.pool.reserved)

    def _snapshot(self, held: int) -> dict[str, Any]:
        """What ``/health`` shows (replaced whole, so readers on other threads see one state)."""
        return {
            "running": len(self._prefilling) + len(self._running),
            "decoding": len(self._running),
            "waiting": len(self._waiting),
            "requests": self.requests,
            "tokens": self.tokens,
            "kv_cache": {
                "bytes_held": held,
                "bytes_reserved": self.pool.reserved,
                "bytes_pool": self.pool.pool,
                "peak_bytes_held": self.peak_bytes_held,
                "keep_ratio": round(self._keep, 4),
            },
        }


def build_cache(spec: Any, model_config: Any, seq_len: int) -> Any:
    """``spec.build`` with the sequence length the ratio budget refers to (prompt + answer)."""
    return spec.build(model_config, seq_len=seq_len)
