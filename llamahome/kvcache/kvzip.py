r"""KVzip (``cache=kvzip``): keep the KV pairs the model needs to reconstruct its own context.

Paper: Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", arXiv 2505.23416 (code: snu-mllab/KVzip; kvpress: ``KVzipPress``).

Rule. After a prefill of the context, the model is asked to repeat it: for each chunk of the
context (``chunk_size`` tokens, default 2,048 as in kvpress) the input
``"\\n\\nRepeat the previous context exactly." + <assistant header> + chunk`` (later chunks:
``"...Repeat the part of the previous context exactly, starting with" + the previous chunk's last
8 tokens``) is run through the model with the context in the cache. In every layer, each query of
that repeat attends (softmax) to the attention sinks, the chunk's own keys and the repeat's keys
(causally); a context key's score is its largest attention probability over the repeat's queries
and over the query heads of its KV head (GQA). A KV pair scores high when reproducing the context
needs it, whatever the question will be (query-agnostic). The cache stores the log of that
probability (`log_scores`), the scale the learned scorer predicts and ``cache.threshold`` is
given in. The first ``sink_tokens`` (4) real tokens are always kept, as in kvpress.

Budgets per KV head are non-uniform, as in the paper: by default (``head_budgets=global``) the
cache's whole budget (layers x KV heads x the per-head budget) goes to the highest scores over
every layer and head, so one head may keep most of the context and another almost none
(``head_budgets=layer``: AdaKV-style within each layer; ``uniform``: every head the same;
``threshold``: every pair scoring at least the threshold). See ``head_budget.py``.

Cost: about one more prefill. The context is kept whole until the reconstruction pass has run
through it (the layers are *deferred*), so the KV of the whole prompt is held once, for every
layer, as a full cache would; the pass itself processes one chunk at a time (the repeat's
queries over the held keys, scores in blocks of 16 MiB of logits), so its activations are those
of a ``chunk_size``-token prefill. The prefill's own logits are the full cache's (nothing is
evicted before them).

Decode. KVzip compresses a context once; decoded tokens have no reconstruction score. When the
model carries a learned scorer (``model=<kv_scorer run>``, ``learned.py``), each decoded token
gets the scorer's prediction of its log KVzip score and competes with the context on the same
scale (KVzap's use of a surrogate at decode). Without one, decoded tokens are kept while in the
recent window (the budget's recent part) and, once out of it, are the first to go (oldest
first), so the compressed context stays as it was chosen. Either way each head keeps its count:
the cache never exceeds its budget. A later multi-token forward (the next chat turn, a second
document) is scored the same way: its tokens are reconstructed, then the whole cache is evicted
down to the budget again.

How it runs inside any ``model(...)`` / ``model.generate(...)`` call: the model carries a forward
hook on its decoder (``model_hooks.enable_cache_hooks``, installed by ``llamahome.load_model``)
that, after a forward which left kvzip layers deferred, runs the reconstruction pass through the
same decoder and then evicts (``head_budget.settle``).
"""

from __future__ import annotations

from typing import Any

import torch

from llamahome.errors import CacheError
from llamahome.kvcache.attention import CACHE_HOOK_KWARG
from llamahome.kvcache.head_budget import HeadBudgetLayer
from llamahome.kvcache.kv_scorer import KVScorer
from llamahome.kvcache.learned import ScorerInputs
from llamahome.kvcache.reconstruction import (
    DEFAULT_CHUNK_SIZE,
    LOG_FLOOR,
    RepeatPrompt,
    kvzip_chunk_scores,
    log_scores,
    reconstruct,
    repeat_prompt,
)
from llamahome.kvcache.slots import new_token_validity

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LOG_FLOOR",
    "KVzipLayer",
    "RepeatPrompt",
    "kvzip_chunk_scores",
    "log_scores",
    "reconstruct",
    "repeat_prompt",
]

# A decoded token's score: its position minus 2**23, below any log score and exact in float32
# (older decoded tokens go first).
_DECODED = float(2**23)


class KVzipLayer(ScorerInputs, HeadBudgetLayer):
    """Reconstruction scores at prefill, per KV head; decoded tokens as the module doc says."""

    policy = "kvzip"
    needs_reconstruction = True

    def __init__(
        self,
        *args: Any,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        score_only: bool = False,
        scorer: KVScorer | None = None,
        layer_idx: int = 0,
        **kwargs: Any,
    ) -> None:
        """See `HeadBudgetLayer`.

        Args:
            *args: The budget (and ``inv_freq``).
            chunk_size: Context tokens reconstructed per pass.
            score_only: Score every prefill but never evict (the teacher for the learned scorer).
            scorer: The model's learned scorer, if it has one: it scores decoded tokens.
            layer_idx: This layer's index in the model.
            **kwargs: ``threshold``, ``head_budgets``.
        """
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size
        self.score_only = score_only
        self.scorer = None if score_only else scorer
        self.layer_idx = layer_idx
        self._scoring: tuple[int, int] | None = None  # slot range of the chunk being scored
        self._probe: tuple[Any, ...] | None = None

    def _should_defer(self, q: int) -> bool:
        return q > 1 and not self._pinning and (self.score_only or not self._never_evicts())

    def _entry_score(self, bsz: int, kv_heads: int, q: int, device: torch.device) -> Any:
        # Prefill tokens are scored by the reconstruction. A decoded token gets the learned
        # scorer's prediction of its (log) KVzip score when the model has a scorer, else it
        # ranks by its age (below every context token once out of the recent window).
        if q == 1 and self.scorer is not None:
            return self._predicted(bsz, kv_heads, q, device)
        self._forget_inputs()
        return float(self._seen_before) - _DECODED if q == 1 else 0.0

    def settle(self, adapt: bool = False) -> None:
        """Evict after the reconstruction (a score-only layer only forgets it was deferred)."""
        if self.score_only:
            self._deferred = 0
            return
        super().settle(adapt)

    # ---- the reconstruction pass ---------------------------------------------------------
    def fresh_slots(self) -> tuple[int, int]:
        """Slot range of the deferred tokens (the last slots, in order)."""
        return self._n - self._deferred, self._n

    def begin_scoring(self, start: int, stop: int) -> None:
        """Score the deferred slots [start, stop) from the next forward (a repeat chunk)."""
        self._compact()
        self._scoring = (start, stop)

    def end_scoring(self) -> None:
        """Back to normal steps."""
        self._scoring = None
        self._probe = None

    def update(self, key_states, value_states, *args: Any, **kwargs: Any):  # noqa: D102
        if self._scoring is None:
            return super().update(key_states, value_states, *args, **kwargs)
        # A repeat chunk: attend over the held slots + the repeat, store nothing.
        attn_kwargs = kwargs.get("kwargs")
        if not isinstance(attn_kwargs, dict):
            raise CacheError("cache.policy=kvzip: this model's attention does not feed the cache.")
        attn_kwargs[CACHE_HOOK_KWARG] = self
        self._awaiting = True
        n, q = self._n, key_states.shape[-2]
        self._q = q
        self._seen_before = self.cumulative_length
        self.cumulative_length += q
        keys = torch.cat((self._state["keys"][:, :, :n], key_states), dim=2)
        values = torch.cat((self._state["values"][:, :, :n], value_states), dim=2)
        return keys, values

    def prepare(self, query, key, attention_mask, position_ids):  # noqa: D102
        if self._scoring is None:
            return super().prepare(query, key, attention_mask, position_ids)
        q, n = self._q, self._n
        mask = self._mask(attention_mask, query, q, n)
        repeat_ok = new_token_validity(attention_mask, q, query.shape[0])
        self._probe = (query, key, repeat_ok)
        return query, key, mask

    def finish(self, scores: torch.Tensor | None) -> None:  # noqa: D102
        if self._scoring is None:
            super().finish(scores)
            return
        query, key, repeat_ok = self._probe
        self._probe = None
        n, q = self._n, self._q
        start, stop = self._scoring
        state = self._state
        bsz, kv_heads = key.shape[0], key.shape[1]
        if repeat_ok is None:
            repeat_ok = torch.ones(bsz, q, dtype=torch.bool, device=key.device)
        # Sinks outside the chunk (inside it they are chunk keys already).
        sink = state["sink"][:, :, :n].clone()
        sink[:, :, start:stop] = False
        count = min(self.budget.sink, n)
        if count:
            flag, index = sink.to(torch.float32).topk(count, dim=-1)
            sink_ok = flag > 0
            sink_keys = key[:, :, :n].gather(2, index[..., None].expand(-1, -1, -1, key.shape[-1]))
        else:
            sink_ok = torch.zeros(bsz, kv_heads, 0, dtype=torch.bool, device=key.device)
            sink_keys = key[:, :, :0]
        chunk_ok = state["valid"][:, :, start:stop]
        state["score"][:, :, start:stop] = log_scores(
            kvzip_chunk_scores(
                query, sink_keys, sink_ok, key[:, :, start:stop], chunk_ok, key[:, :, n:], repeat_ok
            )
        )
        self.cumulative_length = self._seen_before
        self._awaiting = False
        self._work = {}

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self.end_scoring()
        self._forget_inputs()

    def _map_state(self, fn: Any) -> None:
        super()._map_state(fn)
        self._forget_inputs()
