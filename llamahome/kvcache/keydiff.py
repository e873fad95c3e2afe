"""KeyDiff (``cache=keydiff``): evict the keys most similar to their head's mean key.

Paper: Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
Inference in Resource-Constrained Environments", arXiv 2504.15364 (kvpress: ``KeyDiffPress``).

Rule, per layer and KV head: the *anchor* is the mean of the L2-normalised keys held (padding
excluded); a key's score is minus its cosine similarity to the anchor. The recent window (the
budget's recent part) is always kept; of the older keys, those with the highest score (the most
distinctive) fill the rest of the budget. ``budget_ratio`` gives 90% to the score and 10% to the
window (the paper keeps no window; h2o's half-and-half split cost passkey accuracy at 20%: 26/30
against 30/30 with the question protected); the other budget keys mean what they mean for h2o.
Applied at prefill over the prompt's keys, and at every decode step over the kept keys plus the
new one (the anchor follows what is held).

It needs no attention scores, so the attention stays plain SDPA (flash on GPU) with no scoring
pass; the cost is one normalisation and one dot product per held key and step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamahome.kvcache.layers import INF, EvictingLayer

__all__ = ["KeyDiffLayer", "keydiff_scores"]


def keydiff_scores(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Minus the cosine similarity of each key to the mean normalised key of its head.

    Args:
        keys: (batch, kv_heads, n, head_dim).
        valid: (batch, kv_heads, n) False for padding (left out of the anchor); None = all valid.

    Returns:
        float32 (batch, kv_heads, n); higher = more distinctive = kept first.
    """
    unit = F.normalize(keys.float(), p=2, dim=-1)
    if valid is None:
        anchor = unit.mean(dim=2, keepdim=True)
    else:
        weight = valid[..., None].to(unit.dtype)
        anchor = (unit * weight).sum(dim=2, keepdim=True) / weight.sum(dim=2, keepdim=True).clamp(
            min=1.0
        )
    anchor = F.normalize(anchor, p=2, dim=-1)
    return -(unit * anchor).sum(dim=-1)


def _keydiff_rank(work: dict[str, torch.Tensor]) -> torch.Tensor:
    """`keydiff_scores` times a positive number per head, in fewer ops (no padding).

    Minus the cosine of each key to the anchor is ``-(k . a) / (|k| |a|)``. The anchor's
    direction is the sum of the unit keys (the mean's, unnormalised), and ``|a|`` is the same
    for every key of a head, so ``-(k . sum) / |k|`` ranks a head's keys the same way: one norm,
    two batched products, one scale. Only ranks are used (top-k and argmin per head).
    """
    bsz, kv_heads, n, dim = work["keys"].shape
    keys = work["keys"].float().view(bsz * kv_heads, n, dim)
    inv_norm = keys.norm(dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_()  # (rows, n, 1)
    direction = torch.bmm(inv_norm.transpose(1, 2), keys)  # (rows, 1, d): the sum of unit keys
    dots = torch.bmm(keys, direction.transpose(1, 2)).mul_(inv_norm)  # (rows, n, 1)
    return dots.view(bsz, kv_heads, n).neg_()


class KeyDiffLayer(EvictingLayer):
    """The recent window + the older keys least similar (cosine) to their head's mean key."""

    policy = "keydiff"
    fast_meta = True  # a new token's bookkeeping: its position only

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Recent window first, then the KeyDiff score; padding last."""
        _, _, recent = self.budget.sizes(seen)
        valid = None if self._all_valid else work["valid"]
        prio = keydiff_scores(work["keys"], valid) if valid is not None else _keydiff_rank(work)
        if valid is not None:
            prio = prio.masked_fill(~valid, -INF)
        return prio.masked_fill(work["pos"] >= seen - recent, INF)
