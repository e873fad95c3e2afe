"""Knorm (``cache=knorm``): keep the keys of lowest L2 norm.

Paper: Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", EMNLP 2024, arXiv 2406.11430 (kvpress: ``KnormPress``, score = minus the key norm).

Rule, per layer and KV head: a key's score is minus its L2 norm (the paper finds low-norm keys
draw high attention). The recent window (the budget's recent part) is always kept; of the older
keys, the lowest-norm ones fill the rest of the budget. ``budget_ratio`` gives 90% to the norm
and 10% to the window, as for keydiff (the paper and kvpress keep no window; h2o's half-and-half
split scored 0.375 against kvpress's 0.406 on 16 needle prompts at 20%, this split 0.469: see
docs/eval.md, "Fidelity against kvpress"); the other budget keys mean what they mean for h2o.
Applied at prefill and at every decode step. A key's norm never changes, so it is computed once
when the key arrives and stored with the slot; no attention scores are needed (plain SDPA /
flash).
"""

from __future__ import annotations

from typing import Any

import torch

from llamahome.kvcache.layers import INF, EvictingLayer

__all__ = ["KnormLayer"]


class KnormLayer(EvictingLayer):
    """The recent window + the older keys of lowest L2 norm."""

    policy = "knorm"
    # A decode victim is the lowest score outside the recent window, as for h2o: all layers'
    # victims are chosen in one batch (`DecodeGroup`), which also writes the next token's
    # position into the victim's slot (its score, the key norm, is written in `finish`).
    fast_meta = True
    batched_decode = True

    def _new_meta(self, bsz, kv_heads, q, new_valid, position_ids, device):  # noqa: D102
        meta: dict[str, Any] = super()._new_meta(bsz, kv_heads, q, new_valid, position_ids, device)
        meta["score"] = 0.0  # filled with minus the key norm in finish()
        return meta

    def finish(self, scores: torch.Tensor | None) -> None:
        """Store minus the new keys' norms, then evict down to the budget."""
        work, n = self._work, self._n
        if self._slot is not None:
            # Fast decode step: the new key went into the slot the last step freed, not slot n.
            views = self._views()
            norms = views["keys_flat"].index_select(0, self._slot).float().norm(dim=-1)
            views["score_flat"].index_copy_(0, self._slot, norms.neg_())
        else:
            # work["keys"] holds the live slots then the new ones (at prefill, the new ones only).
            work["score"][:, :, n:] = work["keys"][:, :, n:].float().norm(dim=-1).neg_()
        super().finish(None)

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Recent window first, then minus the key norm; padding last."""
        _, _, recent = self.budget.sizes(seen)
        prio = work["score"]
        if not self._all_valid:
            prio = prio.masked_fill(~work["valid"], -INF)
        return prio.masked_fill(work["pos"] >= seen - recent, INF)
