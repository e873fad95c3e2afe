"""The eviction policies: which slots an `EvictingLayer` keeps (window, sink, h2o)."""

from __future__ import annotations

from typing import Any

import torch

from llamahome.errors import CacheError
from llamahome.kvcache.budget import Budget
from llamahome.kvcache.decode_scores import DecodeScores
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
        # Real (non-padding) tokens seen per row: an int while every row has seen as many (no
        # padding so far: the common case costs no tensor op), else a (batch,) tensor.
        self._real_seen: int | torch.Tensor = 0

    @property
    def fast_meta(self) -> bool:  # type: ignore[override]
        """Past the sinks, with no padding, a new token's bookkeeping is its position only."""
        return isinstance(self._real_seen, int) and self._real_seen >= self.budget.sink

    def _new_meta(self, bsz, kv_heads, q, new_valid, position_ids, device):  # noqa: D102
        meta = super()._new_meta(bsz, kv_heads, q, new_valid, position_ids, device)
        real_seen, sink = self._real_seen, self.budget.sink
        if new_valid is None and isinstance(real_seen, int):
            if q == 1:
                meta["sink"] = real_seen < sink
            else:
                rank = torch.arange(real_seen + 1, real_seen + q + 1, device=device)
                meta["sink"] = (rank <= sink)[None, None].expand(bsz, kv_heads, q)
            self._real_seen = real_seen + q
            return meta
        valid, rank = self.real_ranks(bsz, q, new_valid, device)
        # With left padding the sinks are the first real tokens, not the pads at position 0.
        meta["sink"] = expand_heads(valid & (rank <= sink), kv_heads)
        self._real_seen = rank[:, -1].clone()
        return meta

    def real_ranks(
        self, bsz: int, q: int, new_valid: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(validity, rank) of the `q` new tokens, (bsz, q): rank 1 = a row's first real token.

        Padding does not count; read before ``_new_meta`` advances the count.
        """
        real_seen = self._real_seen
        if isinstance(real_seen, int):
            real_seen = torch.full((bsz,), real_seen, dtype=torch.long, device=device)
        elif real_seen.shape[0] != bsz:
            real_seen = torch.zeros(bsz, dtype=torch.long, device=device)
        valid = (
            new_valid
            if new_valid is not None
            else torch.ones(bsz, q, dtype=torch.bool, device=device)
        )
        return valid, valid.long().cumsum(-1) + real_seen[:, None]

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Sinks, then newest first."""
        return work["pos"].masked_fill(work["sink"], torch.iinfo(torch.long).max)

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._real_seen = 0

    def _map_state(self, fn: Any) -> None:
        super()._map_state(fn)
        if isinstance(self._real_seen, torch.Tensor):
            self._real_seen = fn(self._real_seen)


class H2OLayer(DecodeScores, EvictingLayer):
    """Heavy-Hitter Oracle: the recent window + the top-k older tokens by accumulated attention.

    Decode steps score and attend through `DecodeScores` and evict through `DecodeGroup`.
    """

    policy = "h2o"
    needs_scores = True
    fast_meta = True
    batched_decode = True

    def _decode_victim(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Lowest accumulated score outside the recent window (and not pinned)."""
        if not self._all_valid or "pin" in work:
            return super()._decode_victim(work, seen)
        recent = self._recent_slots(seen)
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
