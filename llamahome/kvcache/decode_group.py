"""One batched H2O decode eviction for all the layers of a cache, once per step.

A one-in, one-out H2O decode step picks, in every layer, the slot of lowest accumulated score
outside the recent window (so do knorm, with minus the key norm as the score, and snapkv, whose
window is its observation window: each layer's ``_recent_slots``). Done layer by layer that is
~6 tiny ops per layer (compare, mask, argmin, index arithmetic, and two fills of the next token's
bookkeeping), which at short contexts costs more than the attention it saves. The rule of one
layer does not depend on any other layer, and nothing reads the victim before the next step, so
the group *defers* each layer's choice:
when the last layer has finished the step, it picks the victims of every layer at once, over
score and position buffers stacked as (layers, batch * kv_heads, slots), and writes the next
token's position and zero score into the victims' slots. Which tokens are kept is unchanged
(same scores, same comparison, same first-index tie-break of ``argmin``).

Anything that reads a layer before the group resolved (``keys``, a non-decode update, cropping)
resolves first (`EvictingLayer._dead`); a layer that cannot join (padding, pinned tokens,
buffers with spare slots, position rolling) evicts on its own as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llamahome.kvcache.layers import EvictingLayer

INF = float("inf")


class DecodeGroup:
    """The layers of one cache whose decode victims are chosen together."""

    def __init__(self, layers: list[EvictingLayer]) -> None:
        """Join `layers` (all of one policy and one shared `Budget`)."""
        self.layers = list(layers)
        self.pending = 0
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._row_base: torch.Tensor | None = None
        for layer in self.layers:
            layer._group = self

    def defer(self, layer: EvictingLayer, seen: int) -> bool:
        """Postpone `layer`'s decode victim to the end of the step; False if it cannot join."""
        state = layer._state
        if not layer._all_valid or "pin" in state or layer.inv_freq is not None:
            return False
        if state["score"].shape[2] != layer._n + 1:
            return False  # spare slots: the victim is over a slice; keep the per-layer path
        layer._pending, layer._pending_seen = True, seen
        self.pending += 1
        if self.pending >= len(self.layers):
            self.resolve()
        return True

    def resolve(self) -> None:
        """Choose the victim of every pending layer (batched when all of them are pending)."""
        self.pending = 0
        layers = self.layers
        first = layers[0]
        batched = all(
            layer._pending
            and layer._n == first._n
            and layer._pending_seen == first._pending_seen
            and layer._state["score"].shape == first._state["score"].shape
            for layer in layers
        )
        if not batched:
            for layer in layers:
                if layer._pending:
                    layer._pending = False
                    n, seen = layer._n, layer._pending_seen
                    work = {name: buf[:, :, : n + 1] for name, buf in layer._state.items()}
                    victim = layer._decode_victim(work, seen)
                    layer._dead_idx = layer._slot_base() + victim.view(-1)
            return
        seen = first._pending_seen
        score, pos = self._stacked()
        recent = first._recent_slots(seen)
        victim = score.masked_fill(pos >= seen - recent, INF).argmin(dim=-1, keepdim=True)
        # The next token goes into the victims' slots: its bookkeeping is written here, once.
        pos.scatter_(2, victim, seen)
        score.scatter_(2, victim, 0.0)
        dead = (victim.squeeze(2) + self._row_base).unbind(0)
        for layer, idx in zip(layers, dead, strict=True):
            layer._pending = False
            layer._meta_ready = True
            layer._dead_idx = idx

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, rows, slots) score and position stacks; the layers' buffers are views."""
        views = self._views
        if views and all(
            layer._state["score"] is s and layer._state["pos"] is p
            for layer, (s, p) in zip(self.layers, views, strict=True)
        ):
            return self._stacks  # type: ignore[return-value]
        shape = self.layers[0]._state["score"].shape
        bsz, kv_heads, cap = shape
        score = torch.stack([layer._state["score"] for layer in self.layers])
        pos = torch.stack([layer._state["pos"] for layer in self.layers])
        self._views = []
        for i, layer in enumerate(self.layers):
            views = (score[i], pos[i])  # one view object each: `_stacked` checks identity
            layer._state["score"], layer._state["pos"] = views
            layer._fv = None  # its cached buffer views point at the old tensors
            self._views.append(views)
        rows = len(self.layers), bsz * kv_heads, cap
        self._stacks = (score.view(rows), pos.view(rows))
        self._row_base = torch.arange(bsz * kv_heads, device=score.device) * cap
        return self._stacks


__all__ = ["DecodeGroup"]
