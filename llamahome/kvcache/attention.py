"""Hybrid attention: SDPA output plus H2O heavy-hitter statistics, without an L x L matrix.

`enable_hybrid_attention(model)` registers ``"llamahome_hybrid"`` with transformers'
``AttentionInterface`` (and the SDPA mask builder under the same name with
``AttentionMaskInterface``; an unregistered name would silently get *no* mask) and switches the
model to it.

When the KV cache does not ask for anything (training, ``DynamicCache``, no cache) the function
is transformers' own ``sdpa_attention_forward``, called with the same arguments: speed, masks and
numerics equal ``attn_implementation="sdpa"``.

When a llamahome cache layer (window, sink, h2o; see ``cache_layers.py``) was updated just before,
it has put itself into the attention kwargs under `CACHE_HOOK_KWARG` (transformers 5.x hands the
attention kwargs to ``Cache.update(..., kwargs=kwargs)`` and then to the attention function). The
hook then (1) fixes the mask for the cached slots, which after eviction are no longer the
contiguous positions transformers assumes, (2) lets SDPA compute the output, (3) gets the
attention mass each key received (`attention_column_sums`) if it needs it, and (4) evicts.

The column sums are computed in query chunks with the row log-sum-exp, so the extra memory is
O(L * chunk), never the L x L probability matrix. ``"llamahome_hybrid_eager"`` is the reference
path (eager attention, full probability matrix), used by the tests and by the benchmark as the
llama-recipes-style baseline.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HYBRID_ATTENTION = "llamahome_hybrid"
HYBRID_EAGER_ATTENTION = "llamahome_hybrid_eager"
HYBRID_IMPLEMENTATIONS = (HYBRID_ATTENTION, HYBRID_EAGER_ATTENTION)
CACHE_HOOK_KWARG = "llamahome_cache_layer"

# Elements of one chunk of attention logits (float32): 2**22 = 16 MiB. Big enough that the
# matmuls stay efficient, small enough to be noise next to the activations of a prefill.
SCORE_CHUNK_ELEMENTS = 2**22

__all__ = [
    "CACHE_HOOK_KWARG",
    "HYBRID_ATTENTION",
    "HYBRID_EAGER_ATTENTION",
    "attention_column_sums",
    "eager_column_sums",
    "enable_hybrid_attention",
    "hybrid_attention_forward",
    "hybrid_eager_attention_forward",
    "register_hybrid_attention",
]


class CacheHook(Protocol):
    """What a cache layer offers the attention function (implemented in ``cache_layers.py``)."""

    needs_scores: bool

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Record the new tokens; return the query, key and mask the attention must use."""
        ...

    def finish(self, scores: torch.Tensor | None) -> None:
        """Accumulate the scores (batch x kv_heads x keys) and evict down to the budget."""
        ...


def _scaling(query: torch.Tensor, scaling: float | None) -> float:
    return scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])


def _allowed(
    mask: torch.Tensor | None, rows: slice, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor:
    """Boolean 'may attend' for query rows `rows`, broadcastable to (batch, heads, rows, kv)."""
    if mask is None:
        # Causal, aligned bottom-right: query i sits at key index (kv_len - q_len + i).
        q_idx = torch.arange(rows.start, rows.stop, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= q_idx)[None, None]
    chunk = mask[:, :, rows]
    return chunk if chunk.dtype == torch.bool else chunk == 0


def attention_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    chunk_elements: int = SCORE_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Attention probability mass each key receives, summed over queries and over each GQA group.

    Equals ``softmax(q k^T * scaling + mask).sum(queries)`` grouped by KV head, computed in
    chunks of query rows: each chunk's logits are normalised with their row log-sum-exp, so the
    memory is O(keys * chunk) rather than O(keys * queries).

    Args:
        query: (batch, heads, q_len, head_dim), already rotated.
        key: (batch, kv_heads, kv_len, head_dim), the keys the attention sees.
        attention_mask: None (causal, bottom-right aligned), or a boolean / additive mask of
            shape (batch, 1 or heads, q_len, kv_len).
        scaling: Logit scale; defaults to head_dim ** -0.5.
        chunk_elements: Upper bound on the elements of one chunk of logits.

    Returns:
        float32 tensor (batch, kv_heads, kv_len). Fully masked query rows contribute nothing.
    """
    bsz, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = _scaling(query, scaling)
    keys_t = key.float().transpose(-1, -2)  # (b, kvh, d, L)
    if q_len == 1:
        # Decode: one row per head, so a plain softmax (its max/sum *is* the row LSE); a few
        # ops only, since at short contexts per-op overhead is what a decode step pays for.
        logits = torch.matmul(query.float().view(bsz, kv_heads, groups, dim), keys_t).mul_(scale)
        if attention_mask is not None:
            allowed = _allowed(attention_mask, slice(0, 1), 1, kv_len, query.device)
            allowed = allowed.view(allowed.shape[0], -1, 1, kv_len)
            if allowed.shape[1] == heads and heads != 1:
                allowed = allowed.view(allowed.shape[0], kv_heads, groups, kv_len)
            logits.masked_fill_(~allowed, float("-inf"))
            return torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(dim=2)
        return torch.softmax(logits, dim=-1).sum(dim=2)
    total = torch.zeros(bsz, kv_heads, kv_len, dtype=torch.float32, device=query.device)
    rows_per_chunk = max(1, chunk_elements // max(1, bsz * heads * kv_len))
    offset = kv_len - q_len  # query i sits at key index offset + i (bottom-right causal)
    for start in range(0, q_len, rows_per_chunk):
        stop = min(q_len, start + rows_per_chunk)
        n = stop - start
        # Generation is causal: keys after the chunk's last query are never visible, so the
        # chunk only needs offset + stop columns (half the work of a prefill on average).
        visible = offset + stop
        # Group the query heads of a KV head together so K is never repeated (GQA).
        q = query[:, :, start:stop].float().reshape(bsz, kv_heads, groups * n, dim)
        logits = torch.matmul(q, keys_t[..., :visible]).mul_(scale)
        logits = logits.view(bsz, kv_heads, groups, n, visible)
        if attention_mask is None:
            # Only the chunk's own diagonal block holds future keys.
            future = torch.ones(n, n, dtype=torch.bool, device=query.device).triu_(1)
            logits[..., visible - n :].masked_fill_(future, float("-inf"))
        else:
            allowed = _allowed(attention_mask, slice(start, stop), q_len, kv_len, query.device)
            allowed = allowed[..., :visible]
            if allowed.shape[1] == heads and heads != 1:
                allowed = allowed.reshape(allowed.shape[0], kv_heads, groups, n, visible)
            else:
                allowed = allowed.unsqueeze(1)  # (b|1, 1, 1, n, L): broadcast over heads
            logits.masked_fill_(~allowed, float("-inf"))
        # Row log-sum-exp = row max + log(row sum of exp(logit - max)). A fully masked row
        # (left padding) has max = -inf and gives no mass to anyone.
        row_max = logits.amax(dim=-1, keepdim=True)
        has_keys = torch.isfinite(row_max)
        row_max = torch.where(has_keys, row_max, torch.zeros_like(row_max))
        # Clamp before exp: results below e^-80 would be float32 denormals, ~30x slower on x86;
        # what the clamp adds (< 2e-35 per masked key) is far below any tolerance.
        probs = logits.sub_(row_max).clamp_(min=-80.0).exp_()
        inv_sum = torch.where(has_keys, probs.sum(dim=-1, keepdim=True).reciprocal_(), 0.0)
        # Column sums of probs / row_sum, as one batched (1 x n) @ (n x visible) product.
        col = torch.matmul(inv_sum.transpose(-1, -2), probs)  # (b, kvh, groups, 1, visible)
        total[..., :visible] += col.sum(dim=(2, 3))
    return total


def eager_column_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Compute the reference for `attention_column_sums` from the full probability matrix.

    Args:
        query: (batch, heads, q_len, head_dim).
        key: (batch, kv_heads, kv_len, head_dim).
        attention_mask: As in `attention_column_sums`.
        scaling: Logit scale; defaults to head_dim ** -0.5.

    Returns:
        float32 tensor (batch, kv_heads, kv_len).
    """
    return _eager_probs(query, key, attention_mask, scaling)[1]


def _eager_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    keys = key.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * _scaling(query, scaling)
    allowed = _allowed(attention_mask, slice(0, q_len), q_len, kv_len, query.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    sums = probs.sum(dim=2).view(bsz, kv_heads, groups, kv_len).sum(dim=2)
    return probs, sums


def hybrid_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attend with SDPA and feed the cache hook (the ``llamahome_hybrid`` attention function).

    Same signature as transformers' AttentionInterface functions.

    Args:
        module: The attention module (its ``num_key_value_groups`` selects GQA handling).
        query: (batch, heads, q_len, head_dim).
        key: (batch, kv_heads, kv_len, head_dim).
        value: (batch, kv_heads, kv_len, head_dim).
        attention_mask: The mask transformers built (None, or 4-D boolean).
        dropout: Attention dropout probability (training only).
        scaling: Logit scale.
        **kwargs: Passed on to SDPA; may carry the cache hook.

    Returns:
        (attention output of shape (batch, q_len, heads, head_dim), None).
    """
    hook: CacheHook | None = kwargs.pop(CACHE_HOOK_KWARG, None)
    if hook is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    query, key, mask = hook.prepare(query, key, attention_mask, kwargs.get("position_ids"))
    if (
        mask is None
        and query.shape[2] == 1
        and not (dropout and module.training)
        and hasattr(hook, "attend_decode")
    ):
        # A plain decode step: the layer attends and scores from one softmax (decode_scores.py).
        out = hook.attend_decode(query, value, _scaling(query, scaling))
        if out is not None:
            return out, None
    out, _ = sdpa_attention_forward(
        module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
    )
    if not hook.needs_scores:
        hook.finish(None)
    elif mask is None and query.shape[2] == 1 and hasattr(hook, "add_decode_scores"):
        # A decode step over visible slots: the layer accumulates the scores in place.
        hook.add_decode_scores(query, key, _scaling(query, scaling))
        hook.finish(None)
    else:
        hook.finish(attention_column_sums(query, key, mask, scaling))
    return out, None


def hybrid_eager_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reference path: eager attention whose probabilities also give the H2O scores.

    This is how llama-recipes and the original H2O code work; its prefill memory is O(L^2).
    Same signature and return convention as `hybrid_attention_forward` (plus the weights).
    """
    hook: CacheHook | None = kwargs.pop(CACHE_HOOK_KWARG, None)
    mask = attention_mask
    if hook is not None:
        query, key, mask = hook.prepare(query, key, attention_mask, kwargs.get("position_ids"))
    probs, sums = _eager_probs(query, key, mask, scaling)
    groups = query.shape[1] // key.shape[1]
    values = value.repeat_interleave(groups, dim=1)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs.to(values.dtype), values).transpose(1, 2).contiguous()
    if hook is not None:
        hook.finish(sums if hook.needs_scores else None)
    return out, probs


def register_hybrid_attention() -> None:
    """Register both hybrid functions and their mask builder with transformers (idempotent)."""
    for name, fn in (
        (HYBRID_ATTENTION, hybrid_attention_forward),
        (HYBRID_EAGER_ATTENTION, hybrid_eager_attention_forward),
    ):
        AttentionInterface.register(name, fn)
        # The hybrid output comes from SDPA, so it takes SDPA's boolean 4-D masks (None when a
        # plain causal mask suffices, exactly as for "sdpa").
        AttentionMaskInterface.register(name, sdpa_mask)


def enable_hybrid_attention(
    model: PreTrainedModel, implementation: str = HYBRID_ATTENTION
) -> PreTrainedModel:
    """Switch `model` to the hybrid attention (registering it first). Idempotent.

    Args:
        model: A transformers model whose attention goes through ``AttentionInterface``
            (Llama and most 5.x decoders).
        implementation: `HYBRID_ATTENTION` (default) or `HYBRID_EAGER_ATTENTION` (reference).

    Returns:
        The same model, for chaining.

    Raises:
        ValueError: If `implementation` is not one of the two hybrid names.
    """
    if implementation not in HYBRID_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r}: use one of {', '.join(HYBRID_IMPLEMENTATIONS)}"
        )
    register_hybrid_attention()
    if getattr(model.config, "_attn_implementation", None) != implementation:
        model.set_attn_implementation(implementation)
    return model
