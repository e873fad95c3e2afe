"""Attention probabilities of the last few queries: what TOVA and SnapKV score with.

Both policies look at a handful of query rows only (TOVA: the current query; SnapKV: an
observation window of the last prompt tokens), so the full (rows x keys) probability matrix is
small (rows <= 32) and is computed directly, per query head, in float32.
"""

from __future__ import annotations

import math

import torch

__all__ = ["last_query_probs"]


def last_query_probs(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, rows: int
) -> torch.Tensor:
    """Softmax attention probabilities of the last `rows` queries over every key.

    Args:
        query: (batch, heads, q_len, head_dim), as the attention sees it (rotated).
        key: (batch, kv_heads, kv_len, head_dim); query heads are grouped over KV heads (GQA).
        mask: None (causal, aligned bottom-right), or the boolean / additive 4-D mask the
            attention used, (batch|1, 1|heads, q_len, kv_len).
        rows: How many of the last queries to score with (1 <= rows <= q_len).

    Returns:
        float32 (batch, heads, rows, kv_len); a fully masked row is all zeros.
    """
    bsz, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    q = query[:, :, q_len - rows :].float().reshape(bsz, kv_heads, groups * rows, dim)
    logits = torch.matmul(q, key.float().transpose(-1, -2)).mul_(1.0 / math.sqrt(dim))
    logits = logits.view(bsz, heads, rows, kv_len)
    if mask is None and rows == 1:
        return torch.softmax(logits, dim=-1)  # the last query sees every key: nothing to mask
    if mask is None:
        # Query i of the last `rows` sits at key index kv_len - rows + i.
        last = torch.arange(kv_len - rows, kv_len, device=query.device)[:, None]
        allowed = torch.arange(kv_len, device=query.device)[None, :] <= last
    else:
        allowed = mask[:, :, q_len - rows :]
        if allowed.dtype != torch.bool:
            allowed = allowed == 0
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)
