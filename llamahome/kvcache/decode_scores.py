"""Accumulated attention for a decode step, in place: what h2o and snapkv score with.

H2O (and SnapKV after its prefill) adds, at every decode step, the attention the new query gives
each held key to that key's score. For the one query row of a decode step this is a few batched
ops over the layer's slot buffers (`DecodeScores.add_decode_scores`), and where the buffers are
exactly the working slots, the attention output and the scores come from one softmax
(`DecodeScores.attend_decode`, called by the hybrid attention instead of SDPA).
"""

from __future__ import annotations

import torch

from llamahome.kvcache.attention import attention_column_sums

__all__ = ["DecodeScores"]


class DecodeScores:
    """Mixed into an `EvictingLayer` whose decode scores accumulate attention (h2o, snapkv).

    Uses the layer's ``_in_buffer``, ``_work``, ``_state``, ``_views``, ``_fv``, ``_whole``,
    ``_slot``, ``_all_valid`` and ``finish``.
    """

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
