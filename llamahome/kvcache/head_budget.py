"""Per-head kept counts for the score policies (kvzip, learned): head budgets and thresholds.

The other policies keep the same number of slots in every layer, row and KV head. A score
policy can do better by letting the counts differ (KVzip, arXiv 2505.23416; AdaKV,
arXiv 2407.11550; DMS / KVzap thresholds, arXiv 2506.05345 / 2601.07891):

* ``head_budgets="uniform"``: every head keeps the budget (the classic rule);
* ``"layer"`` (AdaKV): a layer's budget (kv_heads x budget) goes to its best-scored slots,
  whichever head they are in;
* ``"global"`` (KVzip): the whole cache's budget (layers x kv_heads x budget) goes to the
  best-scored slots of any layer and head. The eviction waits until every layer has seen the
  prefill (the layers are *deferred*), then `allocate_global` ranks all their slots at once;
* ``threshold``: keep every slot whose score is at least the threshold (adaptive per prompt,
  layer and head), at most the budget per head (``budget_ratio`` or counts; none = no cap).

How different counts live in one buffer: a layer's buffers are sized to its largest head; a head
that keeps fewer has *holes*, slots whose ``valid`` flag is False, masked exactly as padding is
(``EvictingLayer._mask``). ``kv_bytes`` counts the allocated buffers, ``kept_counts`` the real
tokens, so ``keep_ratio`` reports what is really held.

Decode keeps each head at its count: a head at its target evicts its lowest-priority real token
(the next token takes that slot, no copy), a head below it fills a hole, and a layer grows by one
slot only while some head is still below its target with no hole left. A head's target is the
uniform budget plus its offset (``_delta``, set when an adaptive eviction happened), so the sum
over heads stays the budget's and the counts never drift.

Sinks (the first ``sink`` real tokens, as ``SinkLayer`` marks them), the recent window and pinned
tokens are never evicted.
"""

from __future__ import annotations

from typing import Any

import torch

from llamahome.errors import CacheError
from llamahome.kvcache.budget import Budget
from llamahome.kvcache.layers import INF
from llamahome.kvcache.policies import SinkLayer
from llamahome.kvcache.score_spec import HEAD_BUDGETS

__all__ = ["HEAD_BUDGETS", "HeadBudgetLayer", "allocate_global", "settle"]



class HeadBudgetLayer(SinkLayer):
    """An evicting layer whose heads may keep different numbers of slots (see the module doc).

    Subclasses give each new token its score (`_entry_score`) and may turn the score into a
    priority (`_score_priority`).
    """

    policy = "head_budget"
    needs_reconstruction = False  # kvzip: the deferred tokens need a reconstruction pass
    # Every new token's score comes from `_entry_score` (a scorer's prediction, or its age):
    # never the append step's constant bookkeeping (layers.py, ``fast_meta``).
    fast_meta = False

    def __init__(
        self,
        budget: Budget,
        inv_freq: torch.Tensor | None = None,
        *,
        threshold: float | None = None,
        head_budgets: str = "uniform",
        **kwargs: Any,
    ) -> None:
        """Create an empty layer.

        Args:
            budget: The per-head budget (the cap per head with a threshold).
            inv_freq: Must be None (position rolling is not supported here).
            threshold: Keep slots whose score is >= this (None: the budget alone decides).
            head_budgets: ``uniform``, ``layer`` or ``global`` (see the module doc).
            **kwargs: Passed on (``layer_idx`` and transformers' layer kwargs are ignored).
        """
        super().__init__(budget, inv_freq, **kwargs)
        self.threshold = threshold
        self.head_budgets = head_budgets
        # Per-head offset from the uniform budget, (batch, kv_heads) long; None: all uniform.
        self._delta: torch.Tensor | None = None
        self._deferred = 0  # fresh tokens (the last slots) kept until the cache is settled

    # ---- scores ----------------------------------------------------------------------------
    def _entry_score(self, bsz: int, kv_heads: int, q: int, device: torch.device) -> Any:
        """Score of the `q` new tokens: a float, or a (batch, kv_heads, q) tensor."""
        return 0.0

    def _score_priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Keep-priority from the stored score (higher = kept); the score itself by default."""
        return work["score"]

    def _new_meta(self, bsz, kv_heads, q, new_valid, position_ids, device):  # noqa: D102
        meta = super()._new_meta(bsz, kv_heads, q, new_valid, position_ids, device)
        meta["score"] = self._entry_score(bsz, kv_heads, q, device)
        return meta

    def priority(self, work: dict[str, torch.Tensor], seen: int) -> torch.Tensor:
        """Sinks and the recent window first, then the score; padding and holes last."""
        recent = self.budget.sizes(seen)[2]
        prio = self._score_priority(work, seen)
        prio = prio.masked_fill(work["sink"] | (work["pos"] >= seen - recent), INF)
        if not self._all_valid:
            prio = prio.masked_fill(~work["valid"], -INF)
        return prio

    # ---- targets ---------------------------------------------------------------------------
    def uniform_target(self, seen: int | None = None) -> int:
        """Slots every head keeps under the uniform rule (pinned tokens on top)."""
        seen = self.cumulative_length if seen is None else seen
        return self.budget.total(seen - self._pinned) + self._pinned

    def _targets(self, seen: int) -> int | torch.Tensor:
        uniform = self.uniform_target(seen)
        if self._delta is None:
            return uniform
        return (self._delta + uniform).clamp_(min=0)

    def _never_evicts(self) -> bool:
        """Whether the budget covers the whole sequence (known length, no threshold)."""
        length = self.budget.length
        if self.threshold is not None or length is None or self.budget.basis == "running":
            return False
        return self.budget.total(length) >= length

    def _should_defer(self, q: int) -> bool:
        """Whether this step's new tokens wait for the cache-wide settle (`settle`)."""
        return (
            q > 1
            and not self._pinning
            and self.head_budgets == "global"
            and self.threshold is None
            and not self._never_evicts()
        )

    def _mask(self, mask, query, q, n):  # noqa: D102
        if mask is not None and mask.shape[-1] != n + q:
            # Layers keep different counts, and transformers sized the mask from the first one.
            return self._slot_mask(mask, query, q, n)
        return super()._mask(mask, query, q, n)

    # ---- the step --------------------------------------------------------------------------
    def update(self, key_states, value_states, *args: Any, **kwargs: Any):  # noqa: D102
        if self._deferred:
            raise CacheError(
                f"cache.policy={self.policy}: the last prefill was never settled (its eviction "
                "waits for the model's cache hook). Load the model with llamahome.load_model, or "
                "call llamahome.kvcache.model_hooks.enable_cache_hooks(model, tokenizer) first."
            )
        return super().update(key_states, value_states, *args, **kwargs)

    def finish(self, scores: torch.Tensor | None) -> None:
        """Keep the fresh tokens for the settle, or evict down to each head's target."""
        self._awaiting = False
        work, n, q = self._work, self._n, self._q
        length = n + q
        if self._should_defer(q):
            self._keep_all(work, length)
            self._deferred = q
        elif self._in_buffer and q == 1:
            self._decode_step(work, n)
        else:
            adapt = self.head_budgets == "layer" and self.threshold is None
            self._evict_to_targets(work, length, adapt=adapt)
        if not self._all_valid:
            used = self._n + (self._dead is not None)
            self._all_valid = bool(self._state["valid"][:, :, :used].all())
        self._work = {}
        self._slot = None

    def _keep_all(self, work: dict[str, torch.Tensor], length: int) -> None:
        if self._in_buffer:
            self._n = length
        else:
            self._store(work, torch.arange(length, device=work["pos"].device), length)

    def _decode_step(self, work: dict[str, torch.Tensor], n: int) -> None:
        """One token in: each head keeps its count (evicts one real token or fills a hole)."""
        seen = self.cumulative_length
        prio = self._keep_priority(work, seen)
        target = self._targets(seen)
        if self._all_valid:
            count: int | torch.Tensor = n + 1
            low, victim = prio.min(dim=-1)
        else:
            valid = work["valid"]
            count = valid.sum(dim=-1)
            low, victim = prio.masked_fill(~valid, INF).min(dim=-1)
        evict = count > target
        if not isinstance(evict, torch.Tensor):
            evict = torch.full(victim.shape, evict, dtype=torch.bool, device=victim.device)
        if self.threshold is not None:
            evict = evict | (low < self.threshold)
        if self._all_valid:
            if bool(evict.all()):
                self._dead = self._slot_base() + victim.view(-1)
                return
        else:
            holes = ~work["valid"]
            has_hole = holes.any(dim=-1)
            if bool((evict | has_hole).all()):
                # The next token goes into the victim's slot, or into a hole of a head that is
                # below its target: one dead slot per (row, head), as in a uniform decode step.
                first_hole = holes.to(torch.uint8).argmax(dim=-1)
                slot = torch.where(evict, victim, first_hole)
                self._dead = self._slot_base() + slot.view(-1)
                return
        # Some head is below its target with no hole: the layer grows by the new slot, and
        # the heads that must evict turn their victim into a hole.
        self._n = n + 1
        if bool(evict.any()):
            valid = self._state["valid"]
            index = victim[..., None]
            valid[:, :, : n + 1].scatter_(-1, index, valid.gather(-1, index) & ~evict[..., None])
            self._all_valid = False

    def _evict_to_targets(
        self, work: dict[str, torch.Tensor], length: int, adapt: bool = False
    ) -> None:
        """Keep each head's best slots up to its target (and above the threshold); holes pad."""
        seen = self.cumulative_length
        prio = self._keep_priority(work, seen)
        keep = None if self._all_valid else work["valid"]
        if self.threshold is not None:
            above = prio >= self.threshold
            keep = above if keep is None else keep & above
        if adapt:
            self._delta = _layer_allocation(prio, keep, self.uniform_target(seen))
        target = self._targets(seen)
        count = torch.full(prio.shape[:2], length, device=prio.device) if keep is None else (
            keep.sum(dim=-1)
        )
        kept = torch.minimum(count, torch.as_tensor(target, device=count.device))
        k_max = int(kept.max()) if kept.numel() else 0
        if bool((kept == length).all()) and (keep is None or bool(keep.all())):
            self._keep_all(work, length)  # every head keeps every slot
            return
        k_max = max(k_max, 1)  # an empty buffer would lose the layout; one hole is cheap
        ranked = prio if keep is None else prio.masked_fill(~keep, -INF)
        top = ranked.topk(k_max, dim=-1, sorted=True).indices  # best first
        hole = torch.arange(k_max, device=top.device) >= kept[..., None]
        order = top.argsort(dim=-1)  # slot order: the gathers read memory in order
        self._store(work, top.gather(-1, order), k_max)
        hole = hole.gather(-1, order)
        if bool(hole.any()):
            self._state["valid"][:, :, :k_max] &= ~hole
            self._all_valid = False

    def settle(self, adapt: bool = False) -> None:
        """Evict the deferred prefill down to the targets (after `allocate_global`, if any)."""
        self._deferred = 0
        self._compact()
        n = self._n
        work = {name: buf[:, :, :n] for name, buf in self._state.items()}
        self._in_buffer = True
        self._evict_to_targets(work, n, adapt=adapt)
        if not self._all_valid:
            self._all_valid = bool(self._state["valid"][:, :, : self._n].all())

    def settle_priority(self) -> torch.Tensor:
        """Priority of every live slot, (batch, kv_heads, n), for `allocate_global`."""
        self._compact()
        n = self._n
        work = {name: buf[:, :, :n] for name, buf in self._state.items()}
        prio = self._keep_priority(work, self.cumulative_length)
        if not self._all_valid:
            prio = prio.masked_fill(~work["valid"], -INF)
        return prio

    # ---- plumbing --------------------------------------------------------------------------
    def reset(self) -> None:  # noqa: D102
        super().reset()
        self._delta = None
        self._deferred = 0

    def _map_state(self, fn: Any) -> None:
        super()._map_state(fn)
        if self._delta is not None:
            self._delta = fn(self._delta)


def _layer_allocation(
    prio: torch.Tensor, keep: torch.Tensor | None, uniform: int
) -> torch.Tensor:
    """AdaKV: the layer's kv_heads x `uniform` slots go to its best slots over all heads.

    Returns:
        The per-head offset from `uniform`, (batch, kv_heads) long.
    """
    bsz, kv_heads, length = prio.shape
    ranked = prio if keep is None else prio.masked_fill(~keep, -INF)
    flat = ranked.reshape(bsz, kv_heads * length)
    total = min(kv_heads * uniform, flat.shape[-1])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen.scatter_(-1, flat.topk(total, dim=-1).indices, True)
    chosen &= flat > -INF
    return chosen.view(bsz, kv_heads, length).sum(dim=-1) - uniform


def allocate_global(layers: list[HeadBudgetLayer]) -> None:
    """KVzip: share the whole cache's budget among the best slots of every layer and head.

    Sets each layer's per-head offsets so that its heads keep exactly the slots that rank among
    the row's best ``layers x kv_heads x budget`` over the whole cache.

    Args:
        layers: The deferred layers of one cache (the same tokens seen, the same budget).
    """
    prios = [layer.settle_priority() for layer in layers]
    bsz = prios[0].shape[0]
    uniform = layers[0].uniform_target()
    flat = torch.cat([p.reshape(bsz, -1) for p in prios], dim=-1)
    total = min(sum(p.shape[1] for p in prios) * uniform, flat.shape[-1])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen.scatter_(-1, flat.topk(total, dim=-1).indices, True)
    chosen &= flat > -INF
    start = 0
    for layer, prio in zip(layers, prios, strict=True):
        size = prio[0].numel()
        part = chosen[:, start : start + size].view(prio.shape)
        layer._delta = part.sum(dim=-1) - uniform
        start += size


def settle(layers: list[HeadBudgetLayer]) -> None:
    """Evict every deferred layer of one cache (after any reconstruction pass scored them)."""
    if not layers:
        return
    mode = layers[0].head_budgets
    if mode == "global" and layers[0].threshold is None:
        allocate_global(layers)
    for layer in layers:
        layer.settle(adapt=mode == "layer" and layer.threshold is None)
