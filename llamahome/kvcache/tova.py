"""TOVA (``cache=tova``): evict the token the current query attends to least.

Paper: Oren et al., 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104 (Token Omission
Via Attention; kvpress: ``TOVAPress``).

Rule, per layer: the score of each held token is the attention probability the *current* (last)
query gives it, averaged over all the layer's query heads, as TOVA does (so every KV head of a
layer keeps the same tokens); scores are not accumulated. The tokens of lowest score are evicted
down to the budget (only the total counts: TOVA has no recent window). The newest token is always
kept, as in kvpress (its own attention is usually the highest anyway). Applied at prefill (scored
by the last prompt token) and at every decode step (one eviction per token once full).

The scores come from one extra (heads x held) row of logits per step, computed from the same
rotated query and keys the attention used (``query_attention.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from llamahome.kvcache.layers import INF, EvictingLayer
from llamahome.kvcache.query_attention import last_query_probs

__all__ = ["TOVALayer", "tova_scores"]


def tova_scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of the last query, averaged over all heads, (batch, kv_heads, kv_len) float32."""
    probs = last_query_probs(query, key, mask, rows=1)  # (b, heads, 1, L)
    layer_mean = probs.mean(dim=(1, 2))  # (b, L)
    return layer_mean[:, None, :].expand(key.shape[0], key.shape[1], key.shape[2])


class TOVALayer(EvictingLayer):
    """The tokens the current query attends to most (mean over heads), plus the newest."""

    policy = "tova"
    fast_meta = True  # a new token's bookkeeping: its position and a zero score

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """See `EvictingLayer`."""
        super().__init__(*args, **kwargs)
        self._inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def _new_meta(self, bsz, kv_heads, q, new_valid, position_ids, device):  # noqa: D102
        meta: dict[str, Any] = super()._new_meta(bsz, kv_heads, q, new_valid, position_ids, device)
        meta["score"] = 0.0  # overwritten in finish() by this step's attention
        return meta

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As `EvictingLayer.prepare`; also remember what the attention sees, to score with."""
        self._inputs = super().prepare(query, key, attention_mask, position_ids)
        return self._inputs

    def attend_decode(
        self, query: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        """An evicting decode step over whole buffers: the output and the scores, one softmax.

        TOVA's score is the attention the current query gives each token, so the attention's
        own probabilities are the scores (mean over the layer's heads): no second q K^T pass.
        Same conditions as `DecodeScores.attend_decode` (the token went into the last step's
        victim slot, no padding, float32); otherwise None and the caller takes SDPA.
        """
        if not self._whole or self._slot is None or not self._all_valid:
            return None
        if query.dtype != torch.float32 or not self._evicts():
            return None
        fv = self._fv  # made by `update` this step
        bsz, heads, _, dim = query.shape
        rows, slots = fv["values_rows"].shape[0], fv["values_rows"].shape[1]
        logits = torch.bmm(query.reshape(rows, heads * bsz // rows, dim), fv["keys_t"])
        probs = torch.softmax(logits.mul_(scaling), dim=-1)  # (rows, groups, slots)
        out = torch.bmm(probs, fv["values_rows"])
        mean = probs.view(bsz, heads, slots).mean(dim=1)  # over every head of the layer
        self._work["score"].copy_(mean[:, None].expand(bsz, rows // bsz, slots))
        self._inputs = None  # scored: `finish` only evicts
        self.finish(None)
        return out.view(bsz, 1, heads, dim)

    def finish(self, scores: torch.Tensor | None) -> None:
        """Score every held token by the current query, then evict down to the budget."""
        inputs, self._inputs = self._inputs, None
        # TOVA's scores are this step's attention only (nothing accumulates), so a step that
        # evicts nothing (under the floor, or a budget not yet full) needs none.
        if inputs is not None and self._evicts():
            self._work["score"].copy_(tova_scores(*inputs))
        super().finish(None)

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Rank the newest token first, then this step's attention; padding last."""
        prio = work["score"]
        if not self._all_valid:
            prio = prio.masked_fill(~work["valid"], -INF)
        return prio.masked_fill(work["pos"] == seen - 1, INF)

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._inputs = None
