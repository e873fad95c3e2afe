"""A batch whose rows keep different KV caches: one decode forward over requests with their own.

A serving request owns a whole cache (``CacheSpec.build``: full, h2o, window, ...) with its own
policy and budget, sized for its own prompt + ``max_tokens``. ``RowsCache(caches)`` lines those
caches up as the rows of one decode step, so the model's linear layers run once for the whole
batch while every row attends to, scores and evicts from its own cache, exactly as it would alone:

* ``update`` hands each row's new key and value to that row's layer (an ``EvictingLayer`` or a
  plain ``DynamicLayer``) and puts the ``RowsLayer`` into the attention kwargs;
* the hybrid attention (``attention.py``) asks it to ``prepare`` (nothing to do: no shared mask)
  and then to ``attend_decode``, where each row runs the hybrid attention on its own keys, so
  the row's ``prepare`` / ``finish`` protocol (masks, scores, eviction) is the one it has alone;
* ``observe_hidden`` (the learned scorers' hook) passes each row its own hidden states.

Rows differ in length, so no padded (batch, heads, longest, dim) tensor is ever built: no copy of
anyone's keys, no attention over another row's padding. Only decode steps (one new token per row)
go through here; a prompt is prefilled on its row's own cache (in chunks, by the serving engine).

A row whose layer raises is recorded in ``RowsCache.failures`` and gets zeros from then on; the
other rows of the step are unaffected, and the caller ends that row.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llamahome.errors import CacheError
from llamahome.kvcache.attention import (
    CACHE_HOOK_KWARG,
    HYBRID_IMPLEMENTATIONS,
    hybrid_attention_forward,
)

__all__ = ["RowsCache", "RowsLayer"]


class _RowModule:
    """What the attention functions read from the attention module, for one row's call."""

    training = False
    is_causal = True

    def __init__(self, groups: int) -> None:
        self.num_key_value_groups = groups


class RowsLayer(CacheLayerMixin):
    """One decoder layer of a `RowsCache`: the rows' own layers, side by side."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, layers: list[Any], failures: dict[int, BaseException]) -> None:
        """Line up `layers` (one per row, each a transformers cache layer).

        Args:
            layers: The rows' layers for this decoder layer, in batch order.
            failures: Shared with the `RowsCache`: row index -> the error that ended it.
        """
        super().__init__()
        self.rows = layers
        self.failures = failures
        self.is_initialized = True
        self._step: list[tuple[Any, torch.Tensor, torch.Tensor] | None] = []
        self._positions: torch.Tensor | None = None

    # ---- what transformers reads -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the rows' layers hold the tensors."""

    def get_seq_length(self) -> int:
        """The longest row's tokens seen (rows carry their own positions)."""
        return max((layer.get_seq_length() for layer in self.rows), default=0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Sizes for a mask transformers builds but never uses here (each row masks itself)."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        """No maximum."""
        return -1

    def kv_bytes(self) -> int:
        """Key and value bytes the rows' layers hold."""
        total = 0
        for layer in self.rows:
            if hasattr(layer, "kv_bytes"):
                total += layer.kv_bytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def kept_counts(self) -> tuple[int, int]:
        """(kept, seen) over the rows, their KV heads (for ``keep_ratio``)."""
        kept = seen = 0
        for layer in self.rows:
            if hasattr(layer, "kept_counts"):
                k, s = layer.kept_counts()
            elif getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                k = s = layer.keys.shape[0] * layer.keys.shape[1] * layer.get_seq_length()
            else:
                continue
            kept, seen = kept + k, seen + s
        return kept, seen

    # ---- step protocol -----------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Give each row its new key and value; return placeholders (rows attend on their own).

        Raises:
            CacheError: For more than one new token per row (prefill each row on its own
                cache), or a batch that does not match the rows.
        """
        if key_states.shape[2] != 1:
            raise CacheError(
                f"a RowsCache serves decode steps (one token per row), got {key_states.shape[2]} "
                "tokens: prefill each request on its own cache, then decode the rows together."
            )
        if key_states.shape[0] != len(self.rows):
            raise CacheError(
                f"the batch has {key_states.shape[0]} rows but the RowsCache {len(self.rows)}."
            )
        attn_kwargs = kwargs.get("kwargs")
        if not isinstance(attn_kwargs, dict):
            raise CacheError(
                "a RowsCache needs a transformers 5.x Llama-style attention, which passes its "
                "kwargs to Cache.update."
            )
        step: list[tuple[Any, torch.Tensor, torch.Tensor] | None] = []
        for i, layer in enumerate(self.rows):
            if i in self.failures:
                step.append(None)
                continue
            own: dict[str, Any] = {}
            try:
                keys, values = layer.update(
                    key_states[i : i + 1], value_states[i : i + 1], kwargs=own
                )
            except Exception as err:  # noqa: BLE001 - one row's failure ends that row only
                self.failures[i] = err
                step.append(None)
                continue
            step.append((own.get(CACHE_HOOK_KWARG), keys, values))
        self._step = step
        attn_kwargs[CACHE_HOOK_KWARG] = self
        return key_states, value_states

    needs_scores = False  # never asked: `attend_decode` always answers

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Remember the rows' positions; no shared mask (so the attention asks `attend_decode`)."""
        self._positions = position_ids
        return query, key, None

    def attend_decode(
        self, query: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Attend row by row over each row's own cache, with each row's own hook.

        Args:
            query: (rows, heads, 1, head_dim), rotated.
            value: The placeholder `update` returned (unused).
            scaling: The logit scale.

        Returns:
            (rows, 1, heads, head_dim): each row's output as it would be alone; zeros for a row
            that failed (recorded in ``failures``).
        """
        bsz, heads, _, dim = query.shape
        out = query.new_zeros(bsz, 1, heads, dim)
        positions = self._positions
        for i, entry in enumerate(self._step):
            if entry is None or i in self.failures:
                continue
            hook, keys, values = entry
            row_query = query[i : i + 1]
            module = _RowModule(heads // keys.shape[1])
            try:
                if hook is None:  # a full cache row: every key it holds is visible
                    row_out, _ = sdpa_attention_forward(
                        module, row_query, keys, values, None, scaling=scaling
                    )
                else:
                    row_pos = positions[i : i + 1] if positions is not None else None
                    row_out, _ = hybrid_attention_forward(
                        module, row_query, keys, values, None, scaling=scaling,
                        position_ids=row_pos, **{CACHE_HOOK_KWARG: hook},
                    )
            except Exception as err:  # noqa: BLE001 - one row's failure ends that row only
                self.failures[i] = err
                continue
            out[i : i + 1] = row_out
        self._step = []
        return out

    def finish(self, scores: torch.Tensor | None) -> None:
        """Nothing: each row finished inside `attend_decode`."""

    def observe_hidden(self, hidden_states: torch.Tensor) -> None:
        """Pass each row's hidden states to its layer when that layer observes them (scorers)."""
        for i, layer in enumerate(self.rows):
            observe = getattr(layer, "observe_hidden", None)
            if observe is None or i in self.failures:
                continue
            try:
                observe(hidden_states[i : i + 1])
            except Exception as err:  # noqa: BLE001 - one row's failure ends that row only
                self.failures[i] = err


class RowsCache(Cache):
    """The caches of several requests as the rows of one decode step.

    Attributes:
        caches: The rows' caches, in batch order (each from ``CacheSpec.build``).
        failures: Row index -> the exception that ended that row during the last forward.
    """

    def __init__(self, caches: list[Cache], model_config: Any = None) -> None:
        """Line up `caches` (all for the same model).

        Args:
            caches: One cache per row, each already prefilled.
            model_config: The model's config; when given, checked to use the hybrid attention
                (the only attention that lets each row attend on its own).

        Raises:
            CacheError: For no rows, caches of different depths, or a model whose attention
                is not the hybrid one.
        """
        if not caches:
            raise CacheError("a RowsCache needs at least one row.")
        depth = {len(cache.layers) for cache in caches}
        if len(depth) != 1:
            raise CacheError(f"the rows' caches have different numbers of layers: {sorted(depth)}")
        impl = getattr(model_config, "_attn_implementation", None)
        if model_config is not None and impl not in HYBRID_IMPLEMENTATIONS:
            raise CacheError(
                f"a RowsCache needs the hybrid attention, but the model uses {impl!r}: call "
                "llamahome.kvcache.attention.enable_hybrid_attention(model) first."
            )
        self.caches = list(caches)
        self.failures: dict[int, BaseException] = {}
        layers = [
            RowsLayer([cache.layers[i] for cache in caches], self.failures)
            for i in range(depth.pop())
        ]
        super().__init__(layers=layers)
        self.policy = "rows"
