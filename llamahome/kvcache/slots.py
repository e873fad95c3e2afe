"""Slot tensors of an evicting layer: dtypes, RoPE re-rotation, padding, ``generate()`` plumbing.

The plumbing (beam reorder, batch selection, offload, crop) is the same for every policy.

``layers.py`` holds the eviction protocol itself; this file holds what merely moves or reads the
slot buffers, so the protocol stays readable.
"""

from __future__ import annotations

from typing import Any

import torch

from llamahome.errors import CacheError

__all__ = [
    "INF",
    "META_DTYPES",
    "SlotPlumbing",
    "expand_heads",
    "new_token_validity",
    "rotate",
]

INF = float("inf")
# dtypes of the per-slot bookkeeping tensors (keys/values keep the model's dtype).
META_DTYPES = {
    "pos": torch.long,
    "valid": torch.bool,
    "score": torch.float32,
    "sink": torch.bool,
    "rope": torch.long,
    "pin": torch.bool,
}


def expand_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(batch|1, n) -> (batch|1, kv_heads, n) view."""
    return t[:, None, :].expand(t.shape[0], kv_heads, t.shape[-1])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd vectors by `delta` more positions (RoPE composes additively).

    Args:
        x: (batch, heads, n, head_dim).
        delta: Integer position shifts, broadcastable to (batch, heads, n).
        inv_freq: (head_dim // 2,) RoPE inverse frequencies.

    Returns:
        Rotated tensor, same dtype as `x`. A zero shift returns `x` bit for bit.
    """
    angles = delta[..., None].to(torch.float32) * inv_freq.to(x.device, torch.float32)
    emb = torch.cat((angles, angles), dim=-1)
    xf = x.float()
    return (xf * emb.cos() + _rotate_half(xf) * emb.sin()).to(x.dtype)


def new_token_validity(mask: torch.Tensor | None, q: int, bsz: int) -> torch.Tensor | None:
    """(batch, q) padding validity of the new tokens, read off the mask diagonal; None = all valid.

    Row i of the new block may see column i exactly when token i is not padding (causality always
    allows the diagonal), so the diagonal is the 2-D padding mask of the new tokens.
    """
    if mask is None:
        return None
    diag = mask[:, 0, -q:, -q:].diagonal(dim1=-2, dim2=-1)
    if diag.dtype != torch.bool:
        diag = diag == 0
    return diag.expand(bsz, q)


class SlotPlumbing:
    """The Cache-layer API calls that move whole slot buffers (mixed into ``EvictingLayer``).

    They act on ``self._state`` after settling a pending eviction (``self._compact()``); the
    layer provides ``_state``, ``_n``, ``_store`` and the counters these read.
    """

    def _map_state(self, fn: Any) -> None:
        self._compact()
        self._state = {name: fn(buf) for name, buf in self._state.items()}

    def reset(self) -> None:
        """Forget everything (the object is reused)."""
        self._state, self._work = {}, {}
        self._n = self.cumulative_length = 0
        self._awaiting, self._all_valid = False, True
        self._pinned = 0
        self._dead = self._slot = None
        self._pending = self._meta_ready = self._meta_now = False
        if self._group is not None:
            self._group.pending = 0
        self.budget.reset()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search)."""
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row `repeats` times."""
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows `indices`."""
        self._map_state(lambda t: t[indices])

    def offload(self) -> None:
        """Move the buffers to CPU."""
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        """Move the buffers back to the layer's device."""
        if self.is_initialized:
            self._map_state(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (a negative count, as in transformers 5.x).

        Raises:
            CacheError: If some of those tokens were already evicted from a row or head.
        """
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove (transformers 5.x)")
        if tokens_to_remove == 0 or self._n == 0:
            return
        self._compact()
        new_seen = self.cumulative_length + tokens_to_remove
        keep = self._state["pos"][:, :, : self._n] < new_seen
        counts = keep.sum(dim=-1)
        count = int(counts.flatten()[0])
        if not bool((counts == count).all()):
            raise CacheError(
                f"cannot crop {-tokens_to_remove} tokens from a {self.policy} cache: rows or heads "
                "already evicted different ones"
            )
        index = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :count]
        work = {name: buf[:, :, : self._n] for name, buf in self._state.items()}
        self._store(work, index.sort(dim=-1).values, count)
        self.cumulative_length = new_seen
        if "pin" in self._state:
            self._pinned = int(self._state["pin"][0, 0, :count].sum())
