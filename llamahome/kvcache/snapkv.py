"""SnapKV (``cache=snapkv``): prefill scores from an observation window, then H2O accumulation.

Paper: Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv 2404.14469 (kvpress: ``SnapKVPress``).

Rule, per layer and KV head:

* Prefill: the last ``OBSERVATION_WINDOW`` (64) prompt tokens are the observation window
  (clipped to the prompt length - 1 and to the budget). Each older token's score is the attention
  the window's queries give it, summed over the window, average-pooled over neighbouring
  positions (kernel ``KERNEL_SIZE`` = 5, stride 1, same length, zero padding; the paper's
  "clustering" of the selected positions), then summed over the query heads of the KV head's
  group (GQA; kvpress and the authors' code average, which ranks the same). The window itself is
  always kept (its tokens' scores are their unpooled window attention); of the older tokens, the
  highest scores fill the rest of the budget. Window 64, kernel 5 and average pooling are the
  defaults of the authors' code (``snapkv_utils.py``) and of kvpress's ``SnapKVPress``.
* Decode: H2O-style. Every step adds the attention the new query gives each held token to its
  score; the newest ``window`` tokens are always kept, the lowest score among the others is
  evicted. (SnapKV compresses the prompt only and lets the cache grow while decoding; a bounded
  cache has to evict, and this keeps the observation-window scores as the starting point.)

Which tokens are the observation window decides what SnapKV can find. With the question
compressed (``task.question_protected=false``) the prompt ends with the question, so the window
is the question's tokens: SnapKV's intended setting ("LLM knows what you are looking for"). With
the question protected (kvpress's protocol) the context is compressed before the question
arrives, so the window is the context's last 64 tokens (filler in the RULER-style tasks): there
SnapKV can only keep what the end of the document attends to, and needles within its last 64
tokens (measured in docs/eval.md, "Fidelity against kvpress").

The prefill scores come from one (window x prompt) block of logits per head
(``query_attention.py``), not from the whole prompt's attention matrix; decode steps use the
hybrid attention's column sums, as h2o does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llamahome.kvcache.decode_scores import DecodeScores
from llamahome.kvcache.layers import INF, EvictingLayer
from llamahome.kvcache.query_attention import last_query_probs

__all__ = ["KERNEL_SIZE", "OBSERVATION_WINDOW", "SnapKVLayer", "snapkv_prefill_scores"]

OBSERVATION_WINDOW = 64
KERNEL_SIZE = 5


def snapkv_prefill_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    window: int,
    kernel_size: int = KERNEL_SIZE,
) -> torch.Tensor:
    """SnapKV's prefill score of every prompt token, (batch, kv_heads, L) float32.

    Args:
        query: (batch, heads, L, head_dim), rotated, as the attention saw it.
        key: (batch, kv_heads, L, head_dim).
        mask: The attention's mask (None = causal).
        window: Observation window, 1 <= window < L.
        kernel_size: Max-pooling kernel over positions (odd).

    Returns:
        Pooled window attention for the L - window older tokens, then the unpooled window
        attention of the window's own tokens; summed over each KV head's query heads.
    """
    bsz, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    col = last_query_probs(query, key, mask, rows=window).sum(dim=2)  # (b, heads, L)
    older = length - window
    # count_include_pad: the edges average over the kernel with zeros, as kvpress's avg_pool1d.
    pooled = F.avg_pool1d(col[..., :older], kernel_size, stride=1, padding=kernel_size // 2)
    scores = torch.cat((pooled, col[..., older:]), dim=-1)
    return scores.view(bsz, kv_heads, heads // kv_heads, length).sum(dim=2)


class SnapKVLayer(DecodeScores, EvictingLayer):
    """The observation window + the older tokens of highest pooled window attention.

    Decode steps are h2o's: scores and attention through `DecodeScores`, victims through
    `DecodeGroup`, with the observation window as the recent window.
    """

    policy = "snapkv"
    fast_meta = True
    batched_decode = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """See `EvictingLayer`."""
        super().__init__(*args, **kwargs)
        self._inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.window = OBSERVATION_WINDOW

    @property
    def needs_scores(self) -> bool:  # type: ignore[override]
        """Column sums from the hybrid attention after the prefill (H2O-style accumulation)."""
        return self._in_buffer

    def _new_meta(self, bsz, kv_heads, q, new_valid, position_ids, device):  # noqa: D102
        meta: dict[str, Any] = super()._new_meta(bsz, kv_heads, q, new_valid, position_ids, device)
        meta["score"] = 0.0
        return meta

    def prepare(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As `EvictingLayer.prepare`; at prefill, also remember what the attention sees."""
        out = super().prepare(query, key, attention_mask, position_ids)
        self._inputs = None if self._in_buffer else out
        return out

    def finish(self, scores: torch.Tensor | None) -> None:
        """Prefill: score by the observation window. Decode: accumulate. Then evict."""
        inputs, self._inputs = self._inputs, None
        if inputs is not None and self._q > 1:
            self.window = min(OBSERVATION_WINDOW, self._q - 1)
            self._work["score"].copy_(snapkv_prefill_scores(*inputs, window=self.window))
        super().finish(scores)

    def _recent_slots(self, seen: int) -> int:
        # The budget counts the unpinned tokens (pinned ones are held on top, see EvictingLayer).
        return min(self.window, self.budget.total(seen - self._pinned))

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Rank the window first, then the score; padding last."""
        recent = self._recent_slots(seen)
        prio = work["score"]
        if not self._all_valid:
            prio = prio.masked_fill(~work["valid"], -INF)
        return prio.masked_fill(work["pos"] >= seen - recent, INF)

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._inputs = None
        self.window = OBSERVATION_WINDOW
