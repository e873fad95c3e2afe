"""The eviction policies: which slots an `EvictingLayer` keeps (window, sink, h2o)."""

from __future__ import annotations

from typing import Any

import torch

from llamahome.errors import CacheError
from llamahome.kvcache.attention import attention_column_sums
from llamahome.kvcache.budget import Budget
from llamahome.kvcache.keydiff import KeyDiffLayer
from llamahome.kvcache.knorm import KnormLayer
from llamahome.kvcache.layers import INF, EvictingLayer, expand_heads
from llamahome.kvcache.snapkv import SnapKVLayer
from llamahome.kvcache.tova import TOVALayer


class WindowLayer(EvictingLayer):
    """The recent window only (the H2O paper's "Local" baseline)."""

    policy = "window"
    fast_meta = True

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Newest first."""
        return work["pos"]


class SinkLayer(EvictingLayer):
    """The first `sink` real tokens of each row plus the recent window (StreamingLLM)."""

    policy = "sink"

    def __init__(self, budget: Budget, inv_freq: torch.Tensor | None = None, **kwargs: Any) -> None:
        """See `EvictingLayer`."""
        super().__init__(budget, inv_freq, **kwargs)
        self._real_seen: torch.Tensor | None = None  # real (non-padding) tokens seen per row

    def _new_meta(self, bsz, kv_heads, q, new_valid, position_ids, device):  # noqa: D102
        meta = super()._new_meta(bsz, kv_heads, q, new_valid, position_ids, device)
        valid = (
            new_valid
            if new_valid is not None
            else torch.ones(bsz, q, dtype=torch.bool, device=device)
        )
        if self._real_seen is None or self._real_seen.shape[0] != bsz:
            self._real_seen = torch.zeros(bsz, dtype=torch.long, device=device)
        rank = valid.long().cumsum(-1) + self._real_seen[:, None]
        # With left padding the sinks are the first real tokens, not the pads at position 0.
        meta["sink"] = expand_heads(valid & (rank <= self.budget.sink), kv_heads)
        self._real_seen = rank[:, -1].clone()
        return meta

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Sinks, then newest first."""
        return work["pos"].masked_fill(work["sink"], torch.iinfo(torch.long).max)

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._real_seen = None

    def _map_state(self, fn: Any) -> None:
        super()._map_state(fn)
        if self._real_seen is not None:
            self._real_seen = fn(self._real_seen)


class H2OLayer(EvictingLayer):
    """Heavy-Hitter Oracle: the recent window + the top-k older tokens by accumulated attention."""

    policy = "h2o"
    needs_scores = True
    fast_meta = True
    batched_decode = True
    _ones: torch.Tensor | None = None

    def add_decode_scores(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Add one unmasked decode query's attention to the scores, in three ops.

        Equals ``attention_column_sums`` (softmax of the scaled logits, summed over each GQA
        group) added to the accumulated scores: the logits are one batched product, the group
        sum and the accumulation one more (``baddbmm_`` into the score buffer).

        Args:
            query: (batch, heads, 1, head_dim).
            key: (batch, kv_heads, slots, head_dim), the working slots (a view of the buffer).
            scaling: The logit scale.
        """
        if not self._in_buffer:  # a one-token prefill: nothing stored yet
            self._work["score"] += attention_column_sums(query, key, None, scaling)
            return
        bsz, heads, _, dim = query.shape
        kv_heads, slots = key.shape[1], key.shape[2]
        groups, rows = heads // kv_heads, bsz * kv_heads
        ones = self._ones
        if ones is None or ones.shape != (rows, 1, groups) or ones.dtype != torch.float32:
            ones = self._ones = torch.ones(rows, 1, groups, device=query.device)
        fv = self._views()
        if fv["capacity"] == slots and key.data_ptr() == fv["keys"].data_ptr():
            keys_t, score_rows = fv["keys_t"], fv["score_rows"]  # the whole buffers
        else:
            keys_t = key.reshape(rows, slots, dim).transpose(1, 2)
            score_rows = self._state["score"][:, :, :slots].view(rows, 1, slots)
        q = query.reshape(rows, groups, dim)
        if q.dtype != torch.float32:
            q, keys_t = q.float(), keys_t.float()
        logits = torch.baddbmm(ones[:1, :1, :1], q, keys_t, beta=0.0, alpha=scaling)
        score_rows.baddbmm_(ones, torch.softmax(logits, dim=-1))

    def attend_decode(
        self, query: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        """One decode query over the whole slot buffers: output and scores from one softmax.

        Called after `prepare` (which wrote the new slot's bookkeeping) and instead of SDPA.

        SDPA does not return its probabilities, so the scoring would compute softmax(q K^T)
        a second time; for a single query row the attention is three small batched products
        (logits, probabilities @ V, and the scores' group sum), cheaper than SDPA's kernel
        plus the scoring. Only for the common case: a fast decode step (the token went into
        the last step's victim slot), no padding, buffers exactly the working slots, float32.

        Args:
            query: (batch, heads, 1, head_dim), rotated.
            value: (batch, kv_heads, slots, head_dim), what `update` returned.
            scaling: The logit scale.

        Returns:
            The attention output (batch, 1, heads, head_dim), as the attention functions
            return it, with the scores accumulated and the eviction done; or None when this
            step is not the common case (the caller takes the general path).
        """
        if not self._whole or self._slot is None or not self._all_valid:
            return None
        if query.dtype != torch.float32:
            return None
        fv = self._fv  # made by `update` this step
        bsz, heads, _, dim = query.shape
        rows = fv["score_rows"].shape[0]
        groups = heads // (rows // bsz)
        ones = self._ones
        if ones is None or ones.shape != (rows, 1, groups):
            ones = self._ones = torch.ones(rows, 1, groups, device=query.device)
        logits = torch.baddbmm(
            ones[:1, :1, :1],
            query.reshape(rows, groups, dim),
            fv["keys_t"],
            beta=0.0,
            alpha=scaling,
        )
        probs = torch.softmax(logits, dim=-1)
        out = torch.bmm(probs, fv["values_rows"])  # (rows, groups, dim)
        fv["score_rows"].baddbmm_(ones, probs)
        self.finish(None)
        return out.view(bsz, 1, heads, dim)

    def _decode_victim(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Lowest accumulated score outside the recent window (and not pinned)."""
        if not self._all_valid or "pin" in work:
            return super()._decode_victim(work, seen)
        recent = self.budget.sizes(seen)[2]
        return work["score"].masked_fill(work["pos"] >= seen - recent, INF).argmin(dim=-1)

    def _new_meta(self, bsz, kv_heads, q, new_valid, position_ids, device):  # noqa: D102
        meta = super()._new_meta(bsz, kv_heads, q, new_valid, position_ids, device)
        meta["score"] = 0.0
        return meta

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Recent window first, then accumulated score; padding last."""
        _, _, recent = self.budget.sizes(seen)
        prio = work["score"]
        if not self._all_valid:
            prio = prio.masked_fill(~work["valid"], -INF)
        return prio.masked_fill(work["pos"] >= seen - recent, INF)


LAYER_TYPES: dict[str, type[EvictingLayer]] = {
    "window": WindowLayer,
    "sink": SinkLayer,
    "h2o": H2OLayer,
    "keydiff": KeyDiffLayer,
    "knorm": KnormLayer,
    "tova": TOVALayer,
    "snapkv": SnapKVLayer,
}


def rope_inv_freq(config: Any) -> torch.Tensor:
    """RoPE inverse frequencies of `config`, for position rolling.

    Raises:
        CacheError: For RoPE types whose frequencies depend on the length (dynamic NTK).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope_type in ("dynamic", "longrope") or rope_type not in ROPE_INIT_FUNCTIONS:
        raise CacheError(
            f"cache.position_rolling needs a RoPE whose frequencies do not depend on the length; "
            f"this model uses rope_type={rope_type!r}. Set cache.position_rolling=false."
        )
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv_freq.float()


__all__ = ["LAYER_TYPES", "H2OLayer", "SinkLayer", "WindowLayer", "rope_inv_freq"]
